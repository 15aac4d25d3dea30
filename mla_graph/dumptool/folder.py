"""A phase's dump folder: the files PassManager writes into it, named in one place for writer and readers."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

from torch.fx import GraphModule

from .files import write_text_atomic
from .render import FORMATS_ENV, PASS_FORMATS, format_graph, node_rows, parse_formats, render_svg, require_dot, to_dot

SUMMARY_NAME = "summary.json"
CAPTURE_STEM = "00-capture"
# every file a DumpWriter writes: the capture, a pass's before/after graphs, the summary
_OWN_FILE = re.compile(rf"^({CAPTURE_STEM}|\d\d-\w+\.(before|after))\.(txt|dot|svg)$|^{re.escape(SUMMARY_NAME)}$")
_AFTER_TXT = re.compile(r"^(\d\d-\w+)\.after\.txt$")


def stage_stem(index: int, pass_name: str) -> str:
    """'03-absorb_kv_weights': the stem of pass `index`'s before/after files."""
    return f"{index:02d}-{pass_name}"


def last_after_stem(folder: Path) -> str | None:
    """The stem of the last `NN-<pass>.after.txt` in `folder` (the graph as the pipeline left it)."""
    stems = sorted(m.group(1) for p in folder.iterdir() if (m := _AFTER_TXT.match(p.name)))
    return stems[-1] if stems else None


class DumpWriter:
    """Writes one phase's dumps (whole files or none): the capture, `NN-<pass>.before/.after` in the
    chosen formats, and the pipeline's summary. `formats` as PassManager takes them."""

    def __init__(self, folder: str | os.PathLike, formats: Iterable[str] | str | None = None) -> None:
        self.folder = Path(folder)
        chosen = parse_formats(formats if formats is not None else os.environ.get(FORMATS_ENV) or "txt")
        if "html" in chosen:   # the report (written over the whole dump) is built from the txt dumps
            chosen += ("txt",)
        self.formats = tuple(f for f in PASS_FORMATS if f in chosen)
        if "svg" in self.formats:
            require_dot()

    def start(self, gm: GraphModule, title: str) -> None:
        """A pass that changed nothing writes nothing, so files of an earlier run into the same
        folder would pass for this run's: the manager's own files (and nothing else) go first."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for path in self.folder.iterdir():
            if _OWN_FILE.match(path.name):
                path.unlink()
        self.graph(CAPTURE_STEM, self.render(gm), title)

    def graph(self, stem: str, rendered: tuple[str, list[dict]], title: str, *, created: Sequence[str] = (),
              erased: Sequence[str] = (), pass_name: str = "") -> None:
        """`rendered` (self.render(gm), taken when the graph was as the file should show it) as <stem>.*."""
        text, rows = rendered
        if "txt" in self.formats:
            write_text_atomic(self.folder / f"{stem}.txt", text)
        if "dot" in self.formats or "svg" in self.formats:
            dot = to_dot(rows, title, created=set(created), erased=set(erased), pass_name=pass_name)
            if "dot" in self.formats:
                write_text_atomic(self.folder / f"{stem}.dot", dot)
            if "svg" in self.formats:
                write_text_atomic(self.folder / f"{stem}.svg", render_svg(dot))

    def summary(self, gm: GraphModule, summary: dict) -> None:
        """The pipeline's `summary`, with the formats written and the final graph's nodes."""
        summary = {**summary, "formats": list(self.formats), "nodes": node_rows(gm)}
        write_text_atomic(self.folder / SUMMARY_NAME, json.dumps(summary, indent=2))

    stage_stem = staticmethod(stage_stem)

    @staticmethod
    def render(gm: GraphModule) -> tuple[str, list[dict]]:
        """What the dump files of gm are made from: its txt dump and its node rows."""
        return format_graph(gm), node_rows(gm)

"""Reading a dump folder back: phases, their pipeline summaries and the per-stage graph texts."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .folder import CAPTURE_STEM, SUMMARY_NAME, last_after_stem, stage_stem

META_NAME = "dump.json"          # written by `mla-graph dump`: model, target, formats, layers
TORCHAIR_NAME = "torchair.json"  # per phase, when the target's graph was checked for torchair
GE_GRAPH_NAME = "ge_graph.pbtxt"  # per phase, when torchair's own converters built the GE graph


def split_code(text: str) -> tuple[str, str]:
    """A txt dump -> (header + FX code, node table)."""
    code, sep, table = text.partition("\n\nnode ")
    return code.rstrip() + "\n", ("node " + table) if sep else ""


@dataclass
class PhaseDump:
    name: str
    path: Path
    summary: dict

    @property
    def passes(self) -> list[dict]:
        return self.summary["passes"]

    def text(self, stem: str) -> str | None:
        """The txt dump `<stem>.txt` (e.g. '03-absorb_kv_weights.after'), None if not written."""
        path = self.path / f"{stem}.txt"
        return path.read_text(encoding="utf-8") if path.is_file() else None

    def svg(self, stem: str) -> str | None:
        path = self.path / f"{stem}.svg"
        return path.read_text(encoding="utf-8") if path.is_file() else None

    def changed_stems(self) -> list[str]:
        """'NN-<pass>' of every pass that changed the graph, in pipeline order."""
        return [stage_stem(p["index"], p["name"]) for p in self.passes if p["changed"]]

    def final_text(self) -> str | None:
        """The txt dump of the graph as the pipeline left it (the last pass that changed it)."""
        stem = last_after_stem(self.path)
        return self.text(f"{stem}.after") if stem else self.text(CAPTURE_STEM)

    @property
    def torchair(self) -> dict | None:
        path = self.path / TORCHAIR_NAME
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


@dataclass
class Dump:
    root: Path
    phases: list[PhaseDump]
    meta: dict = field(default_factory=dict)

    def phase(self, name: str) -> PhaseDump | None:
        return next((p for p in self.phases if p.name == name), None)


def load_dump(path: str | Path) -> Dump:
    """A dump root (`<root>/<phase>/summary.json`) or a single phase folder (`<dir>/summary.json`)."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"dump folder {str(root)!r} does not exist or is not a folder")
    if (root / SUMMARY_NAME).is_file():
        folders = [root]
    else:
        order = {name: i for i, name in enumerate(("prefill", "decode", "mixed", "multi_decode", "multi_mixed"))}   # capture.ALL_PHASES
        folders = sorted((p for p in root.iterdir() if (p / SUMMARY_NAME).is_file()),
                         key=lambda p: (order.get(p.name, len(order)), p.name))
    if not folders:
        # the torch.compile backend dumps each layer to <dump_dir>/<layer path>/<phase>/
        nested = sorted({str(p.parent.parent) for p in root.glob(f"*/*/**/{SUMMARY_NAME}")})
        hint = f"; dumps found below it: {', '.join(nested[:5])}" if nested else \
            " (write one with `mla-graph dump --out DIR`, lower(dump_dir=DIR) or MLA_GRAPH_DUMP=DIR)"
        raise ValueError(f"{str(root)!r} is not a dump folder: no summary.json in it or in its subfolders{hint}")
    phases = []
    for folder in folders:
        summary = json.loads((folder / SUMMARY_NAME).read_text(encoding="utf-8"))
        phases.append(PhaseDump(summary.get("phase") or folder.name, folder, summary))
    meta_path = root / META_NAME
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    return Dump(root, phases, meta)

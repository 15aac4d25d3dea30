"""Dumps of a graph: readable FX code with a node table (txt), Graphviz drawings (dot, svg).

Every format shows, per node, its shape, dtype and the pass that made it (node.meta['mla_pass']).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from typing import Collection, Iterable, Sequence

import torch
from torch.fx import GraphModule

from mla_graph.op_kinds import is_device_kernel, op_name
from mla_graph.contract import maybe_meta
from mla_graph.inputs import GraphInput, derivation

__all__ = ["ALL_FORMATS", "CREATED_FILL", "ERASED_FILL", "FORMATS_ENV", "INPUT_FILL", "PASS_FORMATS", "WEIGHT_FILL",
           "GraphvizNotFound", "describe", "format_graph", "format_table", "node_rows", "node_table", "parse_formats",
           "render_svg", "require_dot", "to_dot"]

# Per-pass file formats the manager writes; "html" is a report over a whole dump folder,
# written by whoever owns that folder (mla_graph.dumptool), and is accepted here so one
# format list can name all of them.
PASS_FORMATS = ("txt", "dot", "svg")
ALL_FORMATS = PASS_FORMATS + ("html",)
FORMATS_ENV = "MLA_GRAPH_DUMP_FORMAT"

# Fill colours of the drawings: nodes the pass created, nodes it erased, graph inputs, weights.
CREATED_FILL, ERASED_FILL, INPUT_FILL, WEIGHT_FILL = "#ffc56b", "#f5a3a3", "#cfe3ff", "#e6e6e6"


class GraphvizNotFound(RuntimeError):
    """`--format svg` without Graphviz's `dot` program on PATH."""


def parse_formats(value: str | Iterable[str]) -> tuple[str, ...]:
    """'txt,dot' or ['txt', 'dot'] -> ('txt', 'dot'), validated against ALL_FORMATS."""
    items = [v.strip() for v in (value.split(",") if isinstance(value, str) else value)]
    items = [v for v in items if v]
    bad = [v for v in items if v not in ALL_FORMATS]
    if bad or not items:
        raise ValueError(f"unknown dump format(s) {bad or value!r}; expected a comma-separated list of "
                         f"{', '.join(ALL_FORMATS)}")
    return tuple(dict.fromkeys(items))


def require_dot() -> str:
    path = shutil.which("dot")
    if path is None:
        raise GraphvizNotFound("the svg format needs Graphviz's `dot` program, which is not on PATH; install "
                               "Graphviz (Debian/Ubuntu: apt-get install graphviz; macOS: brew install "
                               "graphviz) or leave svg out of the formats")
    return path


def describe(value: object) -> tuple[str, str]:
    if isinstance(value, torch.Tensor):
        return "[" + ", ".join(str(s) for s in value.shape) + "]", str(value.dtype).replace("torch.", "")
    if isinstance(value, (list, tuple)):
        parts = [describe(v) for v in value]
        return "(" + ", ".join(p[0] for p in parts) + ")", "(" + ", ".join(p[1] for p in parts) + ")"
    if value is None:
        return "-", "-"
    return str(value), type(value).__name__


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "") -> str:
    """A plain-text table: header, a rule of dashes, one line per row, columns padded."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(indent + line for line in lines)


def node_rows(gm: GraphModule) -> list[dict[str, object]]:
    """One dict per node: name, op, target, shape, dtype, made_by, inputs (node names), kernel
    (whether it launches a device kernel: mla_graph.op_kinds.is_device_kernel)."""
    symbols = getattr(maybe_meta(gm), "symbols", {})
    rows = []
    for node in gm.graph.nodes:
        shape, dtype = describe(node.meta.get("val"))
        for sym, name in symbols.items():
            shape = shape.replace(sym, name)
        target = op_name(node.target) if node.op == "call_function" else str(node.target)
        rows.append({"name": node.name, "op": node.op, "target": target, "shape": shape, "dtype": dtype,
                     "made_by": str(node.meta.get("mla_pass", "?")),
                     "inputs": [n.name for n in node.all_input_nodes], "kernel": is_device_kernel(node)})
    return rows


def node_table(gm: GraphModule) -> str:
    rows = [("node", "op", "target", "shape", "dtype", "made by")]
    rows += [(r["name"], r["op"], r["target"], r["shape"], r["dtype"], r["made_by"]) for r in node_rows(gm)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _memoised(inp: GraphInput) -> bool:
    """Computed once per step (its declaration says so; parts never are)."""
    try:
        return inp.part is None and derivation(inp).memo
    except ValueError:   # an input no call provides (a hand-built graph's)
        return False


def format_graph(gm: GraphModule) -> str:
    meta = maybe_meta(gm)
    legend = ", ".join(f"{name}={sym}" for sym, name in getattr(meta, "symbols", {}).items())
    header = f"# phase: {getattr(meta, 'phase', '?')}" + (f"; symbols: {legend}" if legend else "")
    if meta is not None:   # where each input comes from (mla_graph.contract.GraphInput)
        header += "\n# inputs: " + ", ".join(
            f"{i.name} ({i.on}, per {i.per}{', memo' if _memoised(i) else ''}{f', {i.part} part' if i.part else ''})"
            for i in meta.inputs)
    return f"{header}\n{gm.code.strip()}\n\n{node_table(gm)}\n"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(rows: list[dict[str, object]], title: str, *, created: Collection[str] = (), erased: Collection[str] = (),
           pass_name: str = "") -> str:
    """A graph (its `node_rows`) as Graphviz DOT. Nodes in `created` (made by `pass_name`) are filled orange,
    nodes in `erased` red and dashed; every tooltip says which pass made the node."""
    legend = []
    if created:
        legend.append(f"orange: created by {pass_name} ({len(created)})")
    if erased:
        legend.append(f"red, dashed: erased by {pass_name} ({len(erased)})")
    lines = [f"digraph {_quote(title)} {{",
             f"  graph [rankdir=TB, fontname=monospace, fontsize=11, labelloc=t, "
             f"label={_quote(title + (chr(10) + '; '.join(legend) if legend else ''))}];",
             '  node [shape=box, style="rounded,filled", fillcolor=white, fontname=monospace, fontsize=9];',
             "  edge [color=\"#555555\", arrowsize=0.6];"]
    for row in rows:
        name = str(row["name"])
        label = f"{name}\n{row['target']}" + (f"\n{row['shape']} {row['dtype']}" if row["shape"] != "-" else "")
        attrs = {"label": _quote(label), "tooltip": _quote(f"{name}: {row['target']}, made by {row['made_by']}")}
        if row["op"] == "placeholder":
            attrs["fillcolor"] = _quote(INPUT_FILL)
        elif row["op"] == "get_attr":
            attrs["fillcolor"] = _quote(WEIGHT_FILL)
        elif row["op"] == "output":
            attrs["shape"] = "oval"
        if name in created:
            attrs.update(fillcolor=_quote(CREATED_FILL), penwidth="2")
        if name in erased:
            attrs.update(fillcolor=_quote(ERASED_FILL), style='"rounded,filled,dashed"', penwidth="2")
        lines.append(f"  {_quote(name)} [" + ", ".join(f"{k}={v}" for k, v in attrs.items()) + "];")
        lines += [f"  {_quote(str(src))} -> {_quote(name)};" for src in row["inputs"]]
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_svg(dot_text: str) -> str:
    """DOT -> SVG with Graphviz's `dot` (GraphvizNotFound when it is not installed)."""
    proc = subprocess.run([require_dot(), "-Tsvg"], input=dot_text, capture_output=True, text=True,
                          env={**os.environ, "LC_ALL": "C"}, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"Graphviz `dot -Tsvg` failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout

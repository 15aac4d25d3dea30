"""Text dumps of a graph: readable FX code, then one row per node with shape, dtype, provenance."""
from __future__ import annotations

import torch
from torch.fx import GraphModule

from .base import op_name


def describe(value: object) -> tuple[str, str]:
    if isinstance(value, torch.Tensor):
        return "[" + ", ".join(str(s) for s in value.shape) + "]", str(value.dtype).replace("torch.", "")
    if isinstance(value, (list, tuple)):
        parts = [describe(v) for v in value]
        return "(" + ", ".join(p[0] for p in parts) + ")", "(" + ", ".join(p[1] for p in parts) + ")"
    if value is None:
        return "-", "-"
    return str(value), type(value).__name__


def node_table(gm: GraphModule) -> str:
    symbols = gm.meta.get("mla_symbols", {})
    rows = [("node", "op", "target", "shape", "dtype", "made by")]
    for node in gm.graph.nodes:
        shape, dtype = describe(node.meta.get("val"))
        for sym, name in symbols.items():
            shape = shape.replace(sym, name)
        target = op_name(node.target) if node.op == "call_function" else str(node.target)
        rows.append((node.name, node.op, target, shape, dtype, str(node.meta.get("mla_pass", "?"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def format_graph(gm: GraphModule) -> str:
    symbols = gm.meta.get("mla_symbols", {})
    legend = ", ".join(f"{name}={sym}" for sym, name in symbols.items())
    header = f"# phase: {gm.meta.get('mla_phase', '?')}" + (f"; symbols: {legend}" if legend else "")
    return f"{header}\n{gm.code.strip()}\n\n{node_table(gm)}\n"

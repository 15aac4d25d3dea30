"""What counts as a device kernel in a lowered graph (for the kernel budget and the benchmarks)."""
from __future__ import annotations

import torch
from torch.fx import GraphModule

from passes.base import VIEW_OPS

aten = torch.ops.aten

def _markers() -> frozenset:
    air = getattr(torch.ops, "air", None)
    names = ("scope_enter", "scope_exit", "wait_tensor")
    return frozenset(getattr(air, n).default for n in names if air is not None and hasattr(air, n))


def device_kernels(gm: GraphModule) -> list[str]:
    """Compute kernels in node order: call_function nodes that are not views, not torchair's air::
    scope/wait markers, and not the final `copy_` of an updated cache back into its graph input
    (GE turns those into ref outputs/Assign)."""
    markers = _markers()
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target in VIEW_OPS:
            continue
        if node.target is aten.copy_.default and node.args[0].op == "placeholder":
            continue
        if node.target in markers:   # torchair scope markers / control edges, no kernel
            continue
        out.append(str(node.target))
    return out

"""What counts as a device kernel in a lowered graph (for the kernel budget and the benchmarks)."""
from __future__ import annotations

import torch
from torch.fx import GraphModule

from passes.base import VIEW_OPS

aten = torch.ops.aten

def device_kernels(gm: GraphModule) -> list[str]:
    """Compute kernels in node order: call_function nodes that are not views, not torchair's air::
    scope/wait markers, and not the final `copy_` of an updated cache back into its graph input
    (GE turns those into ref outputs/Assign)."""
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target in VIEW_OPS:
            continue
        if node.target is aten.copy_.default and node.args[0].op == "placeholder":
            continue
        if str(node.target).startswith("air."):   # torchair scope markers / control edges, no kernel
            continue
        out.append(str(node.target))
    return out

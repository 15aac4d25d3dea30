"""What counts as a device kernel in a lowered graph (for the kernel budget and the benchmarks)."""
from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule

aten = torch.ops.aten

# Shape-only ops: a view of the same storage on the device, no kernel launch.
VIEW_OPS = frozenset({
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.permute.default,
    aten.transpose.int, aten.t.default, aten.unsqueeze.default, aten.squeeze.dim, aten.expand.default,
    aten.split.Tensor, aten.split_with_sizes.default, aten.slice.Tensor, aten.select.int,
    aten.alias.default, aten.sym_size.int, operator.getitem,
})


def device_kernels(gm: GraphModule) -> list[str]:
    """Compute kernels in node order: call_function nodes that are not views, and not the final
    `copy_` of an updated cache back into its graph input (GE turns those into ref outputs/Assign)."""
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target in VIEW_OPS:
            continue
        if node.target is aten.copy_.default and node.args[0].op == "placeholder":
            continue
        out.append(str(node.target))
    return out

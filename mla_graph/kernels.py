"""What counts as a device kernel in a lowered graph (for the kernel budget and the benchmarks)."""
from __future__ import annotations

from torch.fx import GraphModule

from mla_graph.op_kinds import is_device_kernel


def device_kernels(gm: GraphModule) -> list[str]:
    """The device kernels of `gm` in node order (see mla_graph.op_kinds.is_device_kernel)."""
    return [str(node.target) for node in gm.graph.nodes if is_device_kernel(node)]

"""What kind of call an FX node is, and its name: shape-only views, control markers, device kernels.

Below the passes and the dump tool, which both ask (mla_graph.passes.base re-exports them).
"""
from __future__ import annotations

import operator

import torch
from torch.fx import Node

# Shape-only ops: a view of the same storage on the device, no kernel launch.
VIEW_OPS = frozenset({
    torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default,
    torch.ops.aten.permute.default, torch.ops.aten.transpose.int, torch.ops.aten.t.default,
    torch.ops.aten.unsqueeze.default, torch.ops.aten.squeeze.dim, torch.ops.aten.expand.default,
    torch.ops.aten.split.Tensor, torch.ops.aten.split_with_sizes.default, torch.ops.aten.slice.Tensor,
    torch.ops.aten.select.int, torch.ops.aten.alias.default, torch.ops.aten.sym_size.int, operator.getitem,
})

# Calls a runtime treats as control, not kernels ('ns.op.overload'): who defines them registers
# them (mark_no_kernel; torchair's stream scope / wait markers, mla_graph.npu.air_ops).
NO_KERNEL_OPS: set[str] = set()


def mark_no_kernel(*ops: str) -> None:
    NO_KERNEL_OPS.update(ops)


def is_device_kernel(node: Node) -> bool:
    """A call that launches a kernel on the device: not a view, not a control marker
    (NO_KERNEL_OPS), not the final `copy_` of an updated cache back into its graph input (GE turns
    those into ref outputs / Assign)."""
    if node.op != "call_function" or node.target in VIEW_OPS or str(node.target) in NO_KERNEL_OPS:
        return False
    return not (node.target is torch.ops.aten.copy_.default and node.args[0].op == "placeholder")


def op_name(target: object) -> str:
    """'aten.linear.default', 'mla.rope.default', 'getitem', ..."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return getattr(target, "__name__", str(target))

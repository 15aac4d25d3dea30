"""PassResult, the `graph_pass` decorator and invariants a pass requires or ensures."""
from __future__ import annotations

import operator

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch.fx import GraphModule, Node


@dataclass
class PassResult:
    changed: bool
    matches: int = 0
    matches_by_rule: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    rule_sources: dict[str, str] = field(default_factory=dict)   # rule -> file:line it was defined at (rewrite)

    def count(self, rule: str, n: int = 1) -> None:
        """Record n matches of `rule` (also counted in `matches`)."""
        self.matches += n
        self.matches_by_rule[rule] = self.matches_by_rule.get(rule, 0) + n
        self.changed = self.changed or n > 0


# Shape-only ops: a view of the same storage on the device, no kernel launch.
VIEW_OPS = frozenset({
    torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default,
    torch.ops.aten.permute.default, torch.ops.aten.transpose.int, torch.ops.aten.t.default,
    torch.ops.aten.unsqueeze.default, torch.ops.aten.squeeze.dim, torch.ops.aten.expand.default,
    torch.ops.aten.split.Tensor, torch.ops.aten.split_with_sizes.default, torch.ops.aten.slice.Tensor,
    torch.ops.aten.select.int, torch.ops.aten.alias.default, torch.ops.aten.sym_size.int, operator.getitem,
})

# Calls a runtime treats as control, not kernels ('ns.op.overload'): who defines them registers
# them (mark_no_kernel; torchair's stream scope / wait markers, mla_graph.torchair_compat.air_ops).
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


Violation = tuple["Node | None", str]


@dataclass(frozen=True)
class Invariant:
    """A named property of a graph; `check` returns the violations (node, message)."""

    name: str
    check: Callable[[GraphModule], list[Violation]]

    def __str__(self) -> str:
        return self.name


GraphPass = Callable[[GraphModule], PassResult]


def graph_pass(*, requires: Iterable[Invariant] = (), ensures: Iterable[Invariant] = ()):
    """Declare what a pass needs before it runs and guarantees after; the manager checks both."""
    def wrap(fn: GraphPass) -> GraphPass:
        fn.requires = tuple(requires)  # type: ignore[attr-defined]
        fn.ensures = tuple(ensures)  # type: ignore[attr-defined]
        return fn
    return wrap


def pass_name(fn: GraphPass) -> str:
    return getattr(fn, "pass_name", None) or getattr(fn, "__name__", type(fn).__name__)


def op_name(target: object) -> str:
    """'aten.linear.default', 'mla.rope.default', 'getitem', ..."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return getattr(target, "__name__", str(target))


def no_namespace(namespace: str) -> Invariant:
    """No call into torch.ops.<namespace> is left (e.g. 'mla' after a lowering)."""
    def check(gm: GraphModule) -> list[Violation]:
        return [(n, f"{op_name(n.target)} is still in the graph") for n in gm.graph.nodes
                if n.op == "call_function" and op_name(n.target).startswith(namespace + ".")]
    return Invariant(f"no {namespace}:: op", check)


def no_ops(*targets: object) -> Invariant:
    names = {op_name(t) for t in targets}

    def check(gm: GraphModule) -> list[Violation]:
        return [(n, f"{op_name(n.target)} must not appear") for n in gm.graph.nodes
                if n.op == "call_function" and op_name(n.target) in names]
    return Invariant(f"none of {sorted(names)}", check)


def has_ops(*targets: object) -> Invariant:
    names = {op_name(t) for t in targets}

    def check(gm: GraphModule) -> list[Violation]:
        present = {op_name(n.target) for n in gm.graph.nodes if n.op == "call_function"}
        return [(None, f"{name} is required but absent") for name in sorted(names - present)]
    return Invariant(f"has {sorted(names)}", check)

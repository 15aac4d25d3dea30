"""PassResult, the `graph_pass` decorator and invariants a pass requires or ensures."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

from torch.fx import GraphModule, Node

# what kind of call a node is (views, markers, kernels) and its name: below the dump tool and the passes
from mla_graph.op_kinds import NO_KERNEL_OPS, VIEW_OPS, is_device_kernel, mark_no_kernel, op_name  # noqa: F401


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

"""The verifier the manager runs between passes: lint, fake values present and consistent."""
from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from .base import Violation, op_name
from .graph_utils import fake_run


class PassVerificationError(RuntimeError):
    """A pass left the graph in a state that breaks an invariant."""

    def __init__(self, pass_name: str, node: Node | None, message: str) -> None:
        where = f" at node {node.name!r} ({node.format_node()})" if node is not None else ""
        super().__init__(f"after pass {pass_name!r}: {message}{where}")
        self.pass_name, self.node, self.message = pass_name, node, message


def verify_graph(gm: GraphModule, passed: dict[Node, tuple] | None = None) -> list[Violation]:
    """Structural and shape violations of `gm`, in node order.

    `passed` (the manager keeps one per pipeline run) remembers each call_function node whose fake
    re-run agreed with its meta['val'], with what that result depended on: the node's target, its
    args and kwargs objects, its meta['val'] and its inputs' meta['val'] objects. A node for which
    all of these are the same objects again would give the same result, so it is not re-run; any
    rewrite of it or of an input's value (FX makes new args tuples on every update) checks it again.
    Lint, presence of meta['val'] and get_attr shapes are checked every time."""
    try:
        gm.graph.lint()
    except Exception as exc:  # lint raises plain RuntimeErrors with the reason
        return [(None, f"graph lint failed: {exc}")]
    problems: list[Violation] = []
    for node in gm.graph.nodes:
        if node.op in ("output",):
            continue
        if "val" not in node.meta and not _returns_nothing(node):
            problems.append((node, "has no meta['val'] (every node needs its fake value)"))
            continue
        if node.op == "get_attr":
            problems += _check_attr(gm, node)
        elif node.op == "call_function":
            if passed is None:
                problems += _check_call(node)
                continue
            inputs = _inputs_of(node)
            if _same_objects(passed.get(node), inputs):
                continue
            found = _check_call(node)
            if found:
                passed.pop(node, None)
            else:
                passed[node] = inputs
            problems += found
    return problems


def _inputs_of(node: Node) -> tuple:
    """Everything _check_call's outcome depends on, as objects (compared by identity)."""
    return (node.target, node.args, node.kwargs, node.meta.get("val"),
            *(n.meta.get("val") for n in node.all_input_nodes))


def _same_objects(seen: tuple | None, now: tuple) -> bool:
    return seen is not None and len(seen) == len(now) and all(a is b for a, b in zip(seen, now))


def verify_attrs(gm: GraphModule) -> list[Violation]:
    """The get_attr part of verify_graph: every tensor a graph reads exists with the shape and dtype
    its meta['val'] records (what re-binding a verified graph to other tensors can break)."""
    problems: list[Violation] = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            problems += _check_attr(gm, node) if "val" in node.meta else [(node, "has no meta['val']")]
    return problems


def _returns_nothing(node: Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return schema is not None and len(schema.returns) == 0


def _check_attr(gm: GraphModule, node: Node) -> list[Violation]:
    try:
        real = operator.attrgetter(node.target)(gm)
    except AttributeError:
        return [(node, f"get_attr target {node.target!r} does not exist on the module")]
    val = node.meta["val"]
    if isinstance(real, torch.Tensor) and (tuple(real.shape) != tuple(val.shape) or real.dtype != val.dtype):
        return [(node, f"attribute is {tuple(real.shape)} {real.dtype} but meta['val'] says "
                       f"{tuple(val.shape)} {val.dtype}")]
    return []


def _check_call(node: Node) -> list[Violation]:
    try:
        fresh = fake_run(node.target, node.args, node.kwargs)
    except Exception as exc:
        return [(node, f"{op_name(node.target)} fails on its inputs' fake values: "
                       f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")]
    recorded = node.meta.get("val")
    if _signature(fresh) != _signature(recorded):
        return [(node, f"meta['val'] is {_signature(recorded)} but {op_name(node.target)} gives "
                       f"{_signature(fresh)}")]
    return []


def _signature(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return (tuple(str(s) for s in value.shape), str(value.dtype).replace("torch.", ""))
    if isinstance(value, (list, tuple)):
        return tuple(_signature(v) for v in value)
    if isinstance(value, torch.SymInt):
        return str(value)
    return value

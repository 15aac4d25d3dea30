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


def verify_graph(gm: GraphModule) -> list[Violation]:
    """Structural and shape violations of `gm`, in node order."""
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
            problems += _check_call(node)
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

"""Helpers passes use to build nodes: every new node gets its fake value at creation."""
from __future__ import annotations

from typing import Any

import torch
from torch._guards import detect_fake_mode
from torch.fx import Graph, Node
from torch.fx.node import map_arg


def fake_value(node_or_value: Any) -> Any:
    return node_or_value.meta.get("val") if isinstance(node_or_value, Node) else node_or_value


def fake_run(target: Any, args: tuple, kwargs: dict) -> Any:
    """Run `target` on the fake values of its Node arguments."""
    fargs = map_arg(args, fake_value)
    fkwargs = map_arg(kwargs, fake_value)
    mode = detect_fake_mode(_tensors((fargs, fkwargs)))
    if mode is None:
        return target(*fargs, **fkwargs)
    with mode:
        return target(*fargs, **fkwargs)


def call(graph: Graph, target: Any, *args: Any, **kwargs: Any) -> Node:
    """graph.call_function(target, args, kwargs), with meta['val'] computed on fake tensors."""
    node = graph.call_function(target, args, kwargs)
    node.meta["val"] = fake_run(target, args, kwargs)
    return node


def users_of(node: Node, target: Any) -> list[Node]:
    return [u for u in node.users if u.op == "call_function" and u.target is target]


def _tensors(tree: Any) -> list[torch.Tensor]:
    flat, _ = torch.utils._pytree.tree_flatten(tree)
    return [x for x in flat if isinstance(x, torch.Tensor)]

"""Helpers passes use to build nodes: every new node gets its fake value at creation."""
from __future__ import annotations

from typing import Any

import torch
from torch._guards import detect_fake_mode
from torch.fx import Graph, Node
from torch.fx.node import map_arg

from mla_graph.contract import GraphInput, fake_mode_of, find_input, graph_meta
from mla_graph.torch_compat import fake_mode_context


def fake_value(node_or_value: Any) -> Any:
    return node_or_value.meta.get("val") if isinstance(node_or_value, Node) else node_or_value


def fake_run(target: Any, args: tuple, kwargs: dict) -> Any:
    """Run `target` on the fake values of its Node arguments."""
    fargs = map_arg(args, fake_value)
    fkwargs = map_arg(kwargs, fake_value)
    flat = torch.utils._pytree.tree_flatten((fargs, fkwargs))[0]
    mode = detect_fake_mode(_tensors((fargs, fkwargs))) or next(
        (fake_mode_of(x.node.shape_env) for x in flat if isinstance(x, torch.SymInt)), None)
    if mode is None:
        return target(*fargs, **fkwargs)
    with fake_mode_context(mode):
        return target(*fargs, **fkwargs)


def call(graph: Graph, target: Any, *args: Any, **kwargs: Any) -> Node:
    """graph.call_function(target, args, kwargs), with meta['val'] computed on fake tensors."""
    node = graph.call_function(target, args, kwargs)
    node.meta["val"] = fake_run(target, args, kwargs)
    return node


def _tensors(tree: Any) -> list[torch.Tensor]:
    flat, _ = torch.utils._pytree.tree_flatten(tree)
    return [x for x in flat if isinstance(x, torch.Tensor)]


def add_input(gm, inp: GraphInput, val: Any, part: str | None = None) -> Node:
    """The placeholder reading `inp` (of `part` of a mixed call), added after the others if the graph
    has none yet; the runtime provides its value by its key (mla_graph.inputs)."""
    existing = find_input(gm, inp, part)
    if existing is not None:
        return existing
    declared = inp.of_part(part) if part else inp
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(last):
        node = gm.graph.placeholder(declared.name)
    node.meta["val"] = val
    node.meta["mla_input"] = declared
    meta = graph_meta(gm)
    meta.inputs = [*meta.inputs, declared]
    return node


def remove_input(gm, node: Node) -> None:
    """Erase an unused placeholder and its GraphInput."""
    gm.graph.erase_node(node)
    meta = graph_meta(gm)
    meta.inputs = [i for i in meta.inputs if i is not node.meta["mla_input"]]


def fake_empty(gm, *shape, dtype: torch.dtype) -> torch.Tensor:
    """An empty fake tensor in gm's fake mode (a new input's meta['val'])."""
    with graph_meta(gm).fake_mode:
        return torch.empty(*shape, dtype=dtype)


def new_symbol(gm, name: str, hint: int) -> torch.SymInt:
    """A fresh size symbol in the graph's shape environment (named in dumps as `name`)."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic

    shape_env = graph_meta(gm).fake_mode.shape_env
    source = ConstantSource(name)
    sym = shape_env.create_symbol(hint, source=source, dynamic_dim=DimDynamic.DYNAMIC)
    graph_meta(gm).symbols[str(sym)] = name
    return shape_env.create_symintnode(sym, hint=hint, source=source)


def add_constant(gm, name: str, value: torch.Tensor, before: Node) -> Node:
    """Register `value` on gm (a new tensor, folded at lowering time) and read it with get_attr."""
    gm.register_buffer(name, value, persistent=False)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta["val"] = graph_meta(gm).fake_mode.from_tensor(value, static_shapes=True)
    return node


def first_user_position(gm) -> Node:
    """The first node that is neither a placeholder nor a get_attr: where constants go."""
    return next(n for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr"))


def same_size(a: Any, b: Any) -> bool:
    """Two sizes are equal for every batch: equal ints, or SymInts of one expression once the
    equalities their shape environment knows are substituted (never by their printed form)."""
    if isinstance(a, torch.SymInt) != isinstance(b, torch.SymInt):
        return False
    if not isinstance(a, torch.SymInt):
        return a == b
    ea, eb = a.node.expr, b.node.expr
    env = a.node.shape_env
    if env is not None and env is b.node.shape_env:
        ea, eb = env.simplify(ea), env.simplify(eb)
    return bool(ea == eb)

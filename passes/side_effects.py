"""Side effects in a graph, and the invariant that no rewrite drops one.

A node has a side effect when it writes memory (an op whose schema marks an argument `(a!)`: the
cache writes, `copy_`, `index_put_`; an in-place method such as `out.index_copy_(...)`, which
Dynamo records as call_method; `x[i] = v`; an `out=` argument) or acts outside the graph (what
torch.fx calls impure: asserts, RNG state, profiler ranges). torch.fx's own dead-code elimination
sees only the second kind and the schema'd ops: an in-place *method* whose result nobody reads
looks dead to it, and erasing it silently drops the write (a converted Hugging Face model lost
its attention output that way).

A pass may change how a value is written (mla::cache_write into a fused kernel, a functional
update and a copy back) but not whether:

    before:  mla.cache_write(latent, k_pe, latent_cache, rope_cache, slots)
    after:   npu.npu_kv_rmsnorm_rope_cache_v2(kv, ..., rope_cache, latent_cache, ...)   # still written
    wrong:   (erased)                                                                 # nothing writes it

`effects(graph)` records what a graph writes (by the written value's base, through views) and its
other impure calls; `Effects.lost(graph)` names each one a rewrite dropped while the value it
wrote is still in the graph. The pass manager checks it after every pass (a user's too), the
whole-step inliner after inlining. `eliminate_dead_code` keeps every write whose value is seen.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import Graph, Node

from .base import Violation, op_name

# methods and functions that return a view of their first argument: a write through the view writes it
_VIEW_METHODS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "transpose", "permute", "unsqueeze", "squeeze", "expand",
    "expand_as", "narrow", "select", "t", "flatten", "unflatten", "as_strided", "split", "chunk", "unbind",
    "diagonal", "movedim", "swapaxes", "__getitem__", "detach", "unfold",
})
_VIEW_FUNCTIONS = frozenset({
    torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default,
    torch.ops.aten.permute.default, torch.ops.aten.transpose.int, torch.ops.aten.t.default,
    torch.ops.aten.unsqueeze.default, torch.ops.aten.squeeze.dim, torch.ops.aten.expand.default,
    torch.ops.aten.slice.Tensor, torch.ops.aten.select.int, torch.ops.aten.alias.default,
    torch.ops.aten.as_strided.default, torch.ops.aten.narrow.default, torch.ops.aten.split.Tensor,
    torch.ops.aten.split_with_sizes.default, torch.ops.aten.unbind.int, torch.ops.aten.detach.default,
    operator.getitem, torch.reshape, torch.transpose, torch.permute, torch.unsqueeze, torch.squeeze,
    torch.narrow, torch.select, torch.flatten, torch.split, torch.chunk, torch.unbind, torch.t,
})


def written(node: Node) -> list[Node]:
    """The graph values `node` writes in place (empty: it writes nothing)."""
    if node.op == "call_method":
        return [node.args[0]] if _in_place_name(node.target) and isinstance(node.args[0], Node) else []
    if node.op != "call_function":
        return []
    target = node.target
    if target is operator.setitem:
        return [node.args[0]] if isinstance(node.args[0], Node) else []
    out = [v for v in _flat(node.kwargs.get("out")) if isinstance(v, Node)]
    schema = _schema(target)
    if schema is not None:
        for index, argument in enumerate(schema.arguments):
            if argument.alias_info is None or not argument.alias_info.is_write:
                continue
            value = node.kwargs.get(argument.name, node.args[index] if index < len(node.args)
                                    and not argument.kwarg_only else None)
            out += [v for v in _flat(value) if isinstance(v, Node)]
        return _unique(out)
    # a Python-level in-place function or Tensor method called as a function (torch.Tensor.add_)
    if _in_place_name(getattr(target, "__name__", "")) and node.args and isinstance(node.args[0], Node):
        out.append(node.args[0])
    return _unique(out)


def has_side_effect(node: Node) -> bool:
    """Writes memory or acts outside the graph: never erased as dead."""
    if node.op in ("placeholder", "output"):
        return True
    if written(node):
        return True
    try:
        return node.is_impure()
    except (AssertionError, AttributeError):   # a call_module on a graph with no owning module
        return True


def base_of(value: Node) -> Node:
    """The value a view chain starts from (what a write through the view writes)."""
    seen = set()
    while value not in seen:
        seen.add(value)
        if value.op == "call_method" and value.target in _VIEW_METHODS and value.args \
                and isinstance(value.args[0], Node):
            value = value.args[0]
        elif value.op == "call_function" and value.target in _VIEW_FUNCTIONS and value.args \
                and isinstance(value.args[0], Node) and _is_tensor_view(value):
            value = value.args[0]
        else:
            break
    return value


@dataclass
class Effects:
    """What a graph writes (base value -> the nodes that write it) and its other impure calls."""
    writes: dict[Node, list[Node]]
    impure: list[Node]

    def lost(self, graph: Graph, renamed: dict[Node, Node] | None = None) -> list[Violation]:
        """The side effects of this record that `graph` no longer has: a value written before and
        still in the graph that nothing writes now, or an impure call erased. `renamed` maps the
        recorded nodes to their copies when `graph` is a copy (the inliner's)."""
        def now(node: Node) -> Node:
            return renamed.get(node, node) if renamed else node
        present = set(graph.nodes)
        after = effects(graph)
        problems: list[Violation] = []
        for value, writers in self.writes.items():
            value = now(value)
            if value in present and value not in after.writes:
                ops = ", ".join(sorted({_describe(w) for w in writers}))
                problems.append((value, f"{ops} wrote {value.name} in place and was erased; nothing writes "
                                        f"{value.name} now (a write is a side effect: it is never dead code)"))
        for node in self.impure:
            if now(node) not in present:
                problems.append((None, f"{_describe(node)} ({node.name}) has a side effect and was erased"))
        return problems


def effects(graph: Graph) -> Effects:
    writes: dict[Node, list[Node]] = {}
    impure = []
    for node in graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        targets = written(node)
        for value in targets:
            writes.setdefault(base_of(value), []).append(node)
        if not targets and has_side_effect(node):
            impure.append(node)
    return Effects(writes, impure)


def eliminate_dead_code(graph: Graph) -> bool:
    """Erase what nothing needs; returns whether anything went.

    Needed: the output, placeholders, impure calls, whatever a needed node reads, and every write
    whose written value is visible outside the graph (a placeholder, a get_attr, or a view of one)
    or is read, through any view, by a needed node. A write into a temporary nobody reads (the
    masked_fill_ of a mask whose consumer is gone) is dead with its temporary; FX's own
    elimination keeps the schema'd ones and erases in-place methods even when their value is read."""
    nodes = list(graph.nodes)
    writes = {n: written(n) for n in nodes}     # once: the loop below may visit a node several times
    impure = {n for n in nodes if not writes[n] and has_side_effect(n)}   # placeholders and output too
    base = {n: base_of(n) for n in nodes}
    views: dict[Node, list[Node]] = {}
    for n in nodes:
        views.setdefault(base[n], []).append(n)
    live: set[Node] = set()

    def visible(value: Node) -> bool:
        root = base[value]
        return root.op in ("placeholder", "get_attr") or any(a in live for a in views.get(root, ()))

    changed = True
    while changed:
        changed = False
        for node in reversed(nodes):
            if node in live:
                continue
            needed = node in impure or any(u in live for u in node.users) or any(map(visible, writes[node]))
            if needed:
                live.add(node)
                changed = True
    dead = [n for n in reversed(nodes) if n not in live]
    for node in dead:
        graph.erase_node(node)
    return bool(dead)


def _in_place_name(name: object) -> bool:
    return isinstance(name, str) and name.endswith("_") and not name.startswith("_")


def _schema(target: object):
    if isinstance(target, torch._ops.OpOverload):
        return target._schema
    if isinstance(target, torch._ops.OpOverloadPacket):   # Dynamo records packets: their default overload
        overload = getattr(target, "default", None)
        return overload._schema if overload is not None else None
    return None


def _is_tensor_view(node: Node) -> bool:
    """operator.getitem of a tensor (a slice) is a view; of a tuple (a multi-output op) it is not
    (unknown without a fake value: taken as a view, which keeps more writes, never fewer)."""
    if node.target is not operator.getitem:
        return True
    source = node.args[0]
    val = source.meta.get("val", source.meta.get("example_value"))
    return val is None or isinstance(val, torch.Tensor)


def _describe(node: Node) -> str:
    return f"{node.target}()" if node.op == "call_method" else op_name(node.target)


def _flat(value: object) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _unique(nodes: list[Node]) -> list[Node]:
    return list(dict.fromkeys(nodes))

"""Replacements written as torch code and recorded as written: emit_recorded(g, fn, *args).

make_fx (rewrite.traced) records what the dispatcher ran, which is not always what the code said:
trailing arguments equal to the schema's default are dropped (an NPU kernel's eps or cache_mode
would vanish from the graph) and one symbolic size read twice becomes one node. A replacement whose
exact call matters (a kernel with keyword arguments, a size read where it is used) is recorded
instead, the way torch.fx records a traced function: fn runs once per match on Recorded values,
and every op it calls on them becomes one node of the graph, with the arguments it was given:

    def paged_fia(q, latent_cache, ...):
        _, N, L = q.shape                       # sizes of the graph's fake values (symbols stay)
        out = npu.npu_fused_infer_attention_score.default(q.view(-1, N, 1, L), ..., num_heads=N)
        return out[0].view(-1, N, L)            # getitem of a multi-output op; aten.view

Ops are called as overloads (aten.cat.default, npu.X.default): a torch-level function (torch.cat)
is refused, because it would record a target no later pass names. Tensor methods are the few whose
aten form is one op (view, clone, t, and + - * between tensors); on a size (a node holding a
SymInt, such as aten.sym_size.int's), + - * // record the operator module's functions, as Python's
own arithmetic on sizes does in a graph.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
from torch.fx import Graph, Node

from .graph_utils import call

aten = torch.ops.aten


class Recorded:
    """A graph node as a replacement's code sees it: its fake value's sizes and dtype, and every op
    called on it recorded as a node of `graph` (see the module docstring)."""

    __slots__ = ("node", "graph", "fn")

    def __init__(self, node: Node, graph: Graph, fn: str) -> None:
        self.node, self.graph, self.fn = node, graph, fn

    @property
    def value(self) -> Any:
        return self.node.meta.get("val")

    @property
    def shape(self) -> torch.Size:
        return self._tensor("shape").shape

    @property
    def dtype(self) -> torch.dtype:
        return self._tensor("dtype").dtype

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return self._tensor("dim()").dim()

    def _tensor(self, what: str) -> torch.Tensor:
        if not isinstance(self.value, torch.Tensor):
            raise TypeError(f"replacement {self.fn}: {self.node.name} holds {type(self.value).__name__}, "
                            f"not a tensor; it has no {what}")
        return self.value

    def _call(self, target: Any, *args: Any, **kwargs: Any) -> "Recorded":
        return _record(self.fn, self.graph, target, args, kwargs)

    # tensor methods whose aten form is one op, as the hand-built graphs call them
    def view(self, *shape: Any) -> "Recorded":
        self._tensor("view()")
        sizes = shape[0] if len(shape) == 1 and isinstance(shape[0], (list, tuple)) else shape
        return self._call(aten.view.default, self, list(sizes))

    def clone(self) -> "Recorded":
        self._tensor("clone()")
        return self._call(aten.clone.default, self)

    def t(self) -> "Recorded":
        self._tensor("t()")
        return self._call(aten.t.default, self)

    def __getitem__(self, index: int) -> "Recorded":
        if not isinstance(self.value, (tuple, list)):
            raise TypeError(f"replacement {self.fn}: indexing {self.node.name}, which is not a kernel's "
                            f"tuple of outputs; slice a tensor with aten.slice.Tensor / aten.select.int")
        return self._call(operator.getitem, self, index)

    def _arith(self, other: Any, tensor_op: Any, size_op: Any, reflected: bool = False) -> "Recorded":
        if isinstance(self.value, torch.Tensor):
            if reflected or tensor_op is None:
                where = " on the right" if reflected else ""
                raise TypeError(f"replacement {self.fn}: {size_op.__name__} with the tensor {self.node.name}{where}; "
                                f"call the aten overload (aten.mul.Tensor(x, 2), ...)")
            return self._call(tensor_op, self, other)
        if isinstance(self.value, (torch.SymInt, int)):
            return self._call(size_op, *((other, self) if reflected else (self, other)))
        raise TypeError(f"replacement {self.fn}: arithmetic on {self.node.name} ({type(self.value).__name__})")

    def __add__(self, other: Any) -> "Recorded":
        return self._arith(other, aten.add.Tensor, operator.add)

    def __sub__(self, other: Any) -> "Recorded":
        return self._arith(other, aten.sub.Tensor, operator.sub)

    def __mul__(self, other: Any) -> "Recorded":
        return self._arith(other, aten.mul.Tensor, operator.mul)

    def __floordiv__(self, other: Any) -> "Recorded":
        return self._arith(other, None, operator.floordiv)

    def __radd__(self, other: Any) -> "Recorded":
        return self._arith(other, None, operator.add, reflected=True)

    def __rmul__(self, other: Any) -> "Recorded":
        return self._arith(other, None, operator.mul, reflected=True)

    def __bool__(self) -> bool:
        raise TypeError(f"replacement {self.fn}: the truth of {self.node.name} is known only when the graph "
                        f"runs; branch on sizes (x.shape) instead")

    def __repr__(self) -> str:
        return f"Recorded({self.node.name})"

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        recorded = next(x for x in torch.utils._pytree.tree_leaves((args, kwargs or {})) if isinstance(x, Recorded))
        if not isinstance(func, torch._ops.OpOverload):
            raise TypeError(f"replacement {recorded.fn}: calls {getattr(func, '__name__', func)}, not an op "
                            f"overload; write the op as the graph should name it (aten.cat.default, ...)")
        return _record(recorded.fn, recorded.graph, func, args, kwargs or {})


def _record(fn: str, graph: Graph, target: Any, args: tuple, kwargs: dict) -> Recorded:
    def unwrap(x: Any) -> Any:
        if isinstance(x, Recorded):
            return x.node
        if isinstance(x, torch.Tensor):
            raise ValueError(f"replacement {fn}: a tensor made outside the graph meets it in "
                             f"{getattr(target, '__name__', target)}; pass it in as an argument")
        return x
    args, kwargs = torch.utils._pytree.tree_map(unwrap, (args, kwargs))
    return Recorded(call(graph, target, *args, **kwargs), graph, fn)


def emit_recorded(g: Graph, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs) with every Node among them (also inside lists) seen as a Recorded value,
    its ops recorded into g at the insert point; returns the nodes of its result (a node, a tuple of
    them, or None for a replacement that only writes)."""
    name = getattr(fn, "__name__", "replacement")

    def wrap(x: Any) -> Any:
        return Recorded(x, g, name) if isinstance(x, Node) else x

    def unwrap(x: Any) -> Any:
        if isinstance(x, Recorded):
            return x.node
        if isinstance(x, torch.Tensor):
            raise ValueError(f"replacement {name}: returns a tensor made outside the graph")
        return x
    args, kwargs = torch.utils._pytree.tree_map(wrap, (args, kwargs))
    return torch.utils._pytree.tree_map(unwrap, fn(*args, **kwargs))

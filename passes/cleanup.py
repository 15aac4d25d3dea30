"""Cleanup passes: dead code and views that do nothing."""
from __future__ import annotations

import torch
from torch.fx import GraphModule

from .base import PassResult, graph_pass
from .graph_utils import same_size
from .rewrite import Rule, rewrite
from .side_effects import eliminate_dead_code as eliminate_dead_nodes

aten = torch.ops.aten

_VIEW_OPS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
             aten.alias.default)


@graph_pass()
def eliminate_dead_code(gm: GraphModule) -> PassResult:
    """Erase nodes whose results nobody uses; nodes with a side effect (cache writes, in-place
    methods, copies back) are kept (passes.side_effects).

        linear_3 = aten.linear(x, w)      # unused
      ->  (erased)
    """
    before = len(gm.graph.nodes)
    eliminate_dead_nodes(gm.graph)
    result = PassResult(changed=False)
    result.count("dead node", before - len(gm.graph.nodes))
    return result


@graph_pass()
def remove_noop_views(gm: GraphModule) -> PassResult:
    """A view, reshape or expand to the shape its input already has is its input.

        view = aten.view(x, [T, 48])      # x is [T, 48]
        y = aten.linear(view, w)
      ->  y = aten.linear(x, w)
    """
    return rewrite(gm, NOOP_VIEWS)


def _noop(node) -> bool:
    out, inp = node.meta.get("val"), getattr(node.args[0], "meta", {}).get("val")
    return (isinstance(out, torch.Tensor) and isinstance(inp, torch.Tensor) and _same_shape(out, inp)
            and out.dtype == inp.dtype)


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dim() == b.dim() and all(same_size(x, y) for x, y in zip(a.shape, b.shape))


NOOP_VIEWS = [Rule(str(op).split(".")[1], op, emit=lambda g, n: n.args[0], check=_noop) for op in _VIEW_OPS]

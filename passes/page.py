"""page_latent_attention: gather-then-attend becomes attention that reads the paged cache."""
from __future__ import annotations

import torch
from torch.fx import GraphModule

from .base import PassResult, graph_pass
from .graph_utils import call
from .mla_patterns import _is, _through_views

aten, mla = torch.ops.aten, torch.ops.mla


@graph_pass()
def page_latent_attention(gm: GraphModule) -> PassResult:
    """Latent MQA over gathered context reads the cache blocks itself.

        lat = mla.gather_paged(latent_cache, bt); rope = mla.gather_paged(rope_cache, bt)
        o = mla.attention(cat(ql, q_pe), unsqueeze(cat(lat, rope)), unsqueeze(lat), qsl, seq_lens, s)
      ->
        o = mla.paged_attention(ql, q_pe, latent_cache, rope_cache, bt, qsl, seq_lens, s)
    """
    result = PassResult(changed=False)
    g = gm.graph
    for node in list(g.nodes):
        if not _is(node, mla.attention.default):
            continue
        q, k, v, qsl, seq_lens, scale = node.args
        k_cat, v_src = _through_views(_unsqueezed(k)), _unsqueezed(v)
        if not (_is(q, aten.cat.default) and _is(k_cat, aten.cat.default) and len(k_cat.args[0]) == 2):
            continue
        lat, rope = k_cat.args[0]
        if not (_is(lat, mla.gather_paged.default) and _is(rope, mla.gather_paged.default)
                and v_src is lat and lat.args[1] is rope.args[1]):
            continue
        ql, q_pe = q.args[0]
        with g.inserting_before(node):
            paged = call(g, mla.paged_attention.default, ql, q_pe, lat.args[0], rope.args[0], lat.args[1],
                         qsl, seq_lens, scale)
        node.replace_all_uses_with(paged)
        g.erase_node(node)
        result.count("latent attention over gathered blocks")
    if result.changed:
        g.eliminate_dead_code()
    return result


def _unsqueezed(node):
    return node.args[0] if _is(node, aten.unsqueeze.default) else node

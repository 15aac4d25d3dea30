"""page_latent_attention: gather-then-attend becomes attention that reads the paged cache."""
from __future__ import annotations

import torch
from torch.fx import GraphModule

import mla_graph.primitives  # noqa: F401  (registers torch.ops.mla, which the patterns and rules name)

from .base import PassResult, graph_pass
from .graph_utils import call
from .rewrite import Pattern, Rule, rewrite

aten, mla = torch.ops.aten, torch.ops.mla


@Pattern
def GATHERED_LATENT_ATTENTION(ql, q_pe, latent_cache, rope_cache, block_table, query_start_loc, seq_lens, scale):
    """Latent MQA (one KV head: the latent, with the rope part for keys) over gathered cache blocks."""
    lat = mla.gather_paged.default(latent_cache, block_table)
    k = aten.unsqueeze.default(aten.cat.default([lat, mla.gather_paged.default(rope_cache, block_table)], -1), 2)
    return mla.attention.default(aten.cat.default([ql, q_pe], -1), k, aten.unsqueeze.default(lat, 2),
                                 query_start_loc, seq_lens, scale)


@graph_pass()
def page_latent_attention(gm: GraphModule) -> PassResult:
    """Latent MQA over gathered context reads the cache blocks itself.

        lat = mla.gather_paged(latent_cache, bt); rope = mla.gather_paged(rope_cache, bt)
        o = mla.attention(cat(ql, q_pe), unsqueeze(cat(lat, rope)), unsqueeze(lat), qsl, seq_lens, s)
      ->
        o = mla.paged_attention(ql, q_pe, latent_cache, rope_cache, bt, qsl, seq_lens, s)
    """
    return rewrite(gm, [PAGED], dead_code=True)


PAGED = Rule("latent attention over gathered blocks", GATHERED_LATENT_ATTENTION, emit=lambda g, m: call(
    g, mla.paged_attention.default, m.ql, m.q_pe, m.latent_cache, m.rope_cache, m.block_table, m.query_start_loc,
    m.seq_lens, m.scale))

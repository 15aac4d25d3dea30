"""Traced patterns (passes.rewrite.Pattern) of the plain MLA definition's subgraphs that several passes rewrite."""
from __future__ import annotations

import operator

import torch
from torch.fx import Node

import mla_graph.primitives  # noqa: F401  (registers torch.ops.mla, which the patterns and rules name)

from .rewrite import Match, Pattern

aten, mla = torch.ops.aten, torch.ops.mla


def _decompressed(expanded: bool):
    def decompressed_attention(q_nope, q_pe, latent_cache, rope_cache, block_table, w_kv_b, kv_shape, sizes,
                               rope_shape, heads_shape, query_start_loc, seq_lens, scale):
        """attention(cat(q_nope, q_pe), cat(k_nope, expand(rope)), v) with K/V = kv_b_proj(gather(latent))."""
        kv = aten.view.default(aten.linear.default(mla.gather_paged.default(latent_cache, block_table), w_kv_b),
                               kv_shape)
        k_nope, v = aten.split_with_sizes.default(kv, sizes, -1)
        k_pe = aten.view.default(mla.gather_paged.default(rope_cache, block_table), rope_shape)
        if expanded:      # one head per rank: the expand to the heads is a no-op view, removed by tidy
            k_pe = aten.expand.default(k_pe, heads_shape)
        return mla.attention.default(aten.cat.default([q_nope, q_pe], -1), aten.cat.default([k_nope, k_pe], -1),
                                     v, query_start_loc, seq_lens, scale)
    return decompressed_attention


# m.q_nope, m.q_pe, m.latent_cache, m.rope_cache, m.block_table, m.w_kv_b, m.query_start_loc,
# m.seq_lens, m.scale; m.sizes = [qk_nope, v_dim]
DECOMPRESSED = Pattern(_decompressed(True)) | Pattern(_decompressed(False))


def match_decompressed_attention(node: Node) -> Match | None:
    """The decompressed attention at `node` (DECOMPRESSED), or None."""
    return DECOMPRESSED.match(node) if _is(node, mla.attention.default) else None


def _kv_cache_write(kv, sizes, gamma, eps, positions, table, latent_cache, rope_cache, slots):
    """mla.cache_write(mla.rms_norm(c, gamma, eps), mla.rope(k, positions, table), latent, rope, slots)
    with c, k = split(kv, [L, R])."""
    c, k = aten.split_with_sizes.default(kv, sizes, -1)
    return mla.cache_write.default(mla.rms_norm.default(c, gamma, eps), mla.rope.default(k, positions, table),
                                   latent_cache, rope_cache, slots)


# a fusion takes it only where the normed latent and the roped key feed nothing but the write (the
# matcher's single-use guard); the split before them may have other readers: they keep reading it
KV_CACHE_WRITE = Pattern(_kv_cache_write, shared=(aten.split_with_sizes.default, operator.getitem))


def _is(node: object, target: object) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target is target


def val(node: Node) -> torch.Tensor:
    return node.meta["val"]

"""Matchers for the subgraphs of the plain MLA definition that several passes rewrite."""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import Node

aten, mla = torch.ops.aten, torch.ops.mla


@dataclass
class DecompressedAttention:
    """attention(cat(q_nope, q_pe), cat(k_nope, expand(rope)), v) with K/V = kv_b_proj(gather(latent))."""

    attention: Node
    q_nope: Node
    q_pe: Node
    latent_cache: Node
    rope_cache: Node
    block_table: Node
    w_kv_b: Node
    query_start_loc: Node
    seq_lens: Node
    scale: float
    qk_nope: int
    v_dim: int


def _is(node: object, target: object) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target is target


def _split_part(node: object) -> tuple[Node, int] | None:
    """node = getitem(split_with_sizes(x, sizes, -1), i) -> (split node, i)."""
    if _is(node, operator.getitem) and _is(node.args[0], aten.split_with_sizes.default):
        return node.args[0], node.args[1]
    return None


def _through_views(node: object) -> object:
    while _is(node, aten.view.default) or _is(node, aten.reshape.default) or _is(node, aten.expand.default):
        node = node.args[0]
    return node


def match_decompressed_attention(node: Node) -> DecompressedAttention | None:
    if not _is(node, mla.attention.default):
        return None
    query, k, v, qsl, seq_lens, scale = node.args
    if not (_is(query, aten.cat.default) and len(query.args[0]) == 2 and _is(k, aten.cat.default)
            and len(k.args[0]) == 2):
        return None
    q_nope, q_pe = query.args[0]
    k_nope, k_rope = k.args[0]
    nope_part, v_part = _split_part(k_nope), _split_part(v)
    if nope_part is None or v_part is None or nope_part[0] is not v_part[0] or (nope_part[1], v_part[1]) != (0, 1):
        return None
    split = nope_part[0]
    linear = _through_views(split.args[0])
    if not _is(linear, aten.linear.default) or len(linear.args) != 2:
        return None
    latent_gather, w_kv_b = linear.args
    rope_gather = _through_views(k_rope)
    if not (_is(latent_gather, mla.gather_paged.default) and _is(rope_gather, mla.gather_paged.default)):
        return None
    if latent_gather.args[1] is not rope_gather.args[1]:
        return None
    qk_nope, v_dim = split.args[1]
    return DecompressedAttention(node, q_nope, q_pe, latent_gather.args[0], rope_gather.args[0],
                                 latent_gather.args[1], w_kv_b, qsl, seq_lens, scale, qk_nope, v_dim)


@dataclass
class KvCacheWrite:
    """mla.cache_write(mla.rms_norm(c, gamma, eps), mla.rope(k, positions, table), latent, rope, slots)
    with c, k = split(kv, [L, R])."""

    write: Node
    kv: Node
    gamma: Node
    eps: float
    positions: Node
    table: Node
    latent_cache: Node
    rope_cache: Node
    slots: Node
    exclusive: bool   # the normed latent and roped key feed nothing but the write


def match_kv_cache_write(node: Node) -> KvCacheWrite | None:
    if not _is(node, mla.cache_write.default):
        return None
    normed, roped, latent_cache, rope_cache, slots = node.args
    if not (_is(normed, mla.rms_norm.default) and _is(roped, mla.rope.default)):
        return None
    c_part, k_part = _split_part(normed.args[0]), _split_part(roped.args[0])
    if c_part is None or k_part is None or c_part[0] is not k_part[0] or (c_part[1], k_part[1]) != (0, 1):
        return None
    exclusive = all(u is node for u in list(normed.users) + list(roped.users))
    return KvCacheWrite(node, c_part[0].args[0], normed.args[1], normed.args[2], roped.args[1], roped.args[2],
                        latent_cache, rope_cache, slots, exclusive)


def val(node: Node) -> torch.Tensor:
    return node.meta["val"]

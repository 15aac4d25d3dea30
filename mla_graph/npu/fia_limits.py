"""The documented limits of the real FIA kernel (mla_graph/npu/limits.py) applied to one call.

Which limits apply depends on the call: with query_rope it runs in MLA mode (limits.fia_mla),
a token-major layout (TND, NTD and their output forms) without rope has the TND limits
(limits.fia_tnd), and any other call is limited here only by the query dtype. Advisory
violations pass; a hard one raises KernelLimitError naming the argument as the caller spelt it.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from mla_graph.npu import fia_layout as L
from mla_graph.npu import limits

if TYPE_CHECKING:
    from mla_graph.npu.fia import FiaCall

QUERY_DTYPES = (torch.float16, torch.bfloat16, torch.int8)
QUERY_DTYPE_DOC = {"npu_fused_infer_attention_score": "query, L8065",
                   "npu_fused_infer_attention_score_v2": "query, L8589"}
# Axis of the head count in a non-paged key, by query layout; BSH packs heads into H, which
# num_key_value_heads splits.
KEY_HEAD_AXIS = {"BSND": 2, "BNSD": 1, "NSD": 0, "TND": 1, "NTD": 0}


def enforce(c: FiaCall, layout: L.Layout, num_kv_heads: int) -> None:
    limits.enforce(dataclasses.replace(v, arg=c.name(v.arg)) for v in violations(c, layout, num_kv_heads))


def violations(c: FiaCall, layout: L.Layout, num_kv_heads: int) -> list[limits.Violation]:
    paged = c.block_table is not None
    if c.query_rope is not None:
        return limits.fia_mla(
            dtype=c.query.dtype, num_heads=c.num_heads, latent=_head_dim(c, c.query, layout),
            rope=_head_dim(c, c.query_rope, layout), kv_heads=_key_heads(c, layout, num_kv_heads),
            block_size=c.block_size, paged=paged, query_tokens=_query_tokens(c, layout), op=c.op)
    if layout.token_major:
        # With paging the KV lengths are per request, not cumulative (L8275).
        kv_lens = _known(c.kv_lens) if paged else _per_request(c.kv_lens)
        return limits.fia_tnd(
            dtype=c.query.dtype, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
            qk_dim=_head_dim(c, c.query, layout),
            v_dim=L.value_head_dim(c.op, c.value, c.query, layout, paged, num_kv_heads),
            sparse_mode=c.sparse_mode, has_mask=c.atten_mask is not None,
            tokens=L.query_tnd(c.query, layout.query)[0], q_lens=_per_request(c.q_lens), kv_lens=kv_lens, op=c.op)
    if c.query.dtype not in QUERY_DTYPES:
        return [limits.Violation(c.op, "query.dtype", c.query.dtype, "float16, bfloat16, int8",
                                 QUERY_DTYPE_DOC[c.op])]
    return []


def _head_dim(c: FiaCall, t: torch.Tensor, layout: L.Layout) -> int:
    if layout.token_major:
        return L.query_tnd(t, layout.query)[2]
    return L.query_bsnd(t, layout.query, c.num_heads)[3]


def _key_heads(c: FiaCall, layout: L.Layout, num_kv_heads: int) -> int:
    """Key N: a 4-D (blocknum, KV_N, blocksize, D) or 5-D NZ paged cache holds it at axis 1, a
    3-D (blocknum, blocksize, H) cache is split by num_key_value_heads."""
    if c.block_table is not None:
        axis = 1 if c.key.dim() in (4, 5) else None
    else:
        axis = KEY_HEAD_AXIS.get(layout.query)
    return c.key.size(axis) if axis is not None and c.key.dim() > axis else num_kv_heads


def _query_tokens(c: FiaCall, layout: L.Layout) -> list[int] | None:
    if layout.token_major:
        return _per_request(c.q_lens)
    tokens = L.query_bsnd(c.query, layout.query, c.num_heads)[1]
    return [tokens]   # every batch has the query's S (no `* batch`: B may be a symbol)


def _known(lengths: list | None) -> list[int] | None:
    """The lengths when they are values; None when absent or symbolic (a trace's SymInts)."""
    return lengths if lengths is not None and all(type(n) is int for n in lengths) else None


def _per_request(cumulative: list | None) -> list[int] | None:
    """Per-request lengths from cumulative ends (TND's actual_seq_lengths), when known."""
    ends = _known(cumulative)
    return None if ends is None else [end - start for start, end in zip([0] + ends[:-1], ends)]

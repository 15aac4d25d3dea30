"""lower_paged_attention_to_aten: latent attention as plain aten ops, where no NPU kernel admits it.

FIA is the only fused attention kernel, and its documented limits leave cases out: an fp32 model
(FIA takes fp16/bf16/int8 queries), MLA mode outside latent 512 / rope 64 / block size 16 or 128,
and prefill chunks over 16 tokens per request (MLA mode's query length). Those calls keep their
meaning as gather + bmm + softmax + bmm, which every backend runs (GE converts each op).
"""
from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

import mla_graph.primitives  # noqa: F401  (registers torch.ops.mla, which the patterns and rules name)

from .base import PassResult, graph_pass
from .graph_utils import call, same_size
from .mla_patterns import val
from .rewrite import Rule, rewrite

aten, mla = torch.ops.aten, torch.ops.mla
FALLBACK_RULE = "paged latent attention (aten)"


@graph_pass()
def lower_paged_attention_to_aten(gm: GraphModule) -> PassResult:
    """Every mla.paged_attention left after the FIA lowering -> aten ops over each token's blocks.

        o = mla.paged_attention(ql[T,N,L], q_pe[T,N,R], latent[NB,BS,1,L], rope[NB,BS,1,R], bt[B,MB], qsl, seq_lens, s)
      ->
        rows = bt (one token per request) | index_select(bt, 0, request_of_token)      # [T, MB]
        k = view(index_select(cache[NB,BS,1,D], 0, view(rows, [-1])), [T, MB*BS, D])    # each cache
        p = softmax(masked_fill(s * bmm(q, k^T), arange(MB*BS) > last_visible[T, 1], min), -1)
        o = bmm(p, k_latent)                                                             # [T, N, L]

    Scores and softmax run in float32 (as the reference does), the output in the model dtype.
    """
    return rewrite(gm, [Rule(FALLBACK_RULE, mla.paged_attention.default, emit=lambda g, n: _emit(g, *n.args))])


def _emit(g, ql: Node, q_pe: Node, latent: Node, rope: Node, bt: Node, qsl: Node, seq_lens: Node,
          scale: float) -> Node:
    T, N, L = val(ql).shape
    R = val(q_pe).shape[-1]
    BS = val(latent).shape[1]
    one_token_per_request = same_size(T, val(bt).shape[0])
    # sizes that are symbols are read from the graph (aten.sym_size), never baked in as numbers
    S = call(g, operator.mul, call(g, aten.sym_size.int, bt, 1), BS)                  # keys per token
    if one_token_per_request:
        rows = bt
        last = call(g, aten.sub.Tensor, seq_lens, 1)                                   # [T]
    else:
        request = _request_of_token(g, qsl, ql)
        rows = call(g, aten.index_select.default, bt, 0, request)
        ends = call(g, aten.index_select.default, call(g, aten.slice.Tensor, qsl, 0, 1), 0, request)
        positions = _arange(g, call(g, aten.sym_size.int, ql, 0))
        start = call(g, aten.sub.Tensor, call(g, aten.index_select.default, seq_lens, 0, request), ends)
        last = call(g, aten.add.Tensor, start, positions)                               # seq_len - end + t
    flat_rows = call(g, aten.view.default, rows, [-1])

    def gather(cache: Node, width: int) -> Node:
        # whole blocks straight from the 4-D cache: its rows may be strided (the latent and rope
        # parts of vLLM's one 576-wide cache), so no [NB, BS*D] view of it exists
        picked = call(g, aten.index_select.default, cache, 0, flat_rows)            # [T*MB, BS, 1, D]
        return call(g, aten.view.default, picked, [-1, S, width])

    keys = _arange(g, S)
    hidden = call(g, aten.gt.Tensor, call(g, aten.view.default, keys, [1, -1, 1]),
                  call(g, aten.view.default, last, [-1, 1, 1]))                          # [T, S, 1]
    # Rows past a token's context (other requests' blocks, unwritten slots) may hold anything,
    # NaN included: zeroed before they meet a zero probability.
    c = call(g, aten.masked_fill.Scalar,
             call(g, aten._to_copy.default, gather(latent, L), dtype=torch.float32), hidden, 0.0)  # [T, S, L]
    k_pe = call(g, aten.masked_fill.Scalar,
                call(g, aten._to_copy.default, gather(rope, R), dtype=torch.float32), hidden, 0.0)  # [T, S, R]
    q = call(g, aten._to_copy.default, call(g, aten.cat.default, [ql, q_pe], -1), dtype=torch.float32)
    k = call(g, aten.cat.default, [c, k_pe], -1)
    scores = call(g, aten.mul.Tensor, call(g, aten.bmm.default, q, call(g, aten.transpose.int, k, 1, 2)), scale)
    masked = call(g, aten.masked_fill.Scalar, scores, call(g, aten.transpose.int, hidden, 1, 2),
                  torch.finfo(torch.float32).min)                                         # [T, N, S]
    p = call(g, aten._softmax.default, masked, -1, False)
    out = call(g, aten.bmm.default, p, c)
    return call(g, aten._to_copy.default, out, dtype=val(ql).dtype)


def _arange(g, end: Node) -> Node:
    return call(g, aten.arange.start, 0, end, dtype=torch.int64)


def _request_of_token(g, qsl: Node, q: Node) -> Node:
    """request[t] = number of requests that end at or before token t (query_start_loc[1:] <= t)."""
    tokens = _arange(g, call(g, aten.sym_size.int, q, 0))
    ends = call(g, aten.slice.Tensor, qsl, 0, 1)
    ended = call(g, aten.le.Tensor, call(g, aten.view.default, ends, [1, -1]), call(g, aten.view.default, tokens, [-1, 1]))
    return call(g, aten.sum.dim_IntList, ended, [1])

"""lower_paged_attention_to_aten: latent attention as plain aten ops, where no NPU kernel admits it.

FIA is the only fused attention kernel, and its documented limits leave cases out: an fp32 model
(FIA takes fp16/bf16/int8 queries), MLA mode outside latent 512 / rope 64 / block size 16 or 128,
and prefill chunks over 16 tokens per request (MLA mode's query length). Those calls keep their
meaning as gather + bmm + softmax + bmm, which every backend runs (GE converts each op).
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule

import mla_graph.primitives  # noqa: F401  (registers torch.ops.mla, which the patterns and rules name)

from .base import PassResult, graph_pass
from .graph_utils import same_size
from .recording import emit_recorded
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
    return rewrite(gm, [Rule(FALLBACK_RULE, mla.paged_attention.default,
                             emit=lambda g, n: emit_recorded(g, paged_attention_in_aten, *n.args))])


def paged_attention_in_aten(ql, q_pe, latent, rope, bt, qsl, seq_lens, scale: float):
    """The replacement, recorded as written (emit_recorded): sizes that are symbols are read from the
    graph (aten.sym_size), never baked in as numbers."""
    T, N, L = ql.shape
    R = q_pe.shape[-1]
    BS = latent.shape[1]
    S = aten.sym_size.int(bt, 1) * BS                                                  # keys per token
    if same_size(T, bt.shape[0]):          # one token per request
        rows = bt
        last = seq_lens - 1                                                            # [T]
    else:
        request = _request_of_token(qsl, ql)
        rows = aten.index_select.default(bt, 0, request)
        ends = aten.index_select.default(aten.slice.Tensor(qsl, 0, 1), 0, request)
        positions = _arange(aten.sym_size.int(ql, 0))
        start = aten.index_select.default(seq_lens, 0, request) - ends
        last = start + positions                                                       # seq_len - end + t
    flat_rows = rows.view(-1)

    def gather(cache, width: int):
        # whole blocks straight from the 4-D cache: its rows may be strided (the latent and rope
        # parts of vLLM's one 576-wide cache), so no [NB, BS*D] view of it exists
        return aten.index_select.default(cache, 0, flat_rows).view(-1, S, width)       # [T, S, D]

    hidden = aten.gt.Tensor(_arange(S).view(1, -1, 1), last.view(-1, 1, 1))           # [T, S, 1]
    # Rows past a token's context (other requests' blocks, unwritten slots) may hold anything,
    # NaN included: zeroed before they meet a zero probability.
    c = aten.masked_fill.Scalar(aten._to_copy.default(gather(latent, L), dtype=torch.float32), hidden, 0.0)
    k_pe = aten.masked_fill.Scalar(aten._to_copy.default(gather(rope, R), dtype=torch.float32), hidden, 0.0)
    q = aten._to_copy.default(aten.cat.default([ql, q_pe], -1), dtype=torch.float32)
    k = aten.cat.default([c, k_pe], -1)
    scores = aten.bmm.default(q, aten.transpose.int(k, 1, 2)) * scale
    masked = aten.masked_fill.Scalar(scores, aten.transpose.int(hidden, 1, 2), torch.finfo(torch.float32).min)
    p = aten._softmax.default(masked, -1, False)                                       # [T, N, S]
    return aten._to_copy.default(aten.bmm.default(p, c), dtype=ql.dtype)


def _arange(end):
    return aten.arange.start(0, end, dtype=torch.int64)


def _request_of_token(qsl, q):
    """request[t] = number of requests that end at or before token t (query_start_loc[1:] <= t)."""
    tokens = _arange(aten.sym_size.int(q, 0))
    ends = aten.slice.Tensor(qsl, 0, 1)
    return aten.sum.dim_IntList(aten.le.Tensor(ends.view(1, -1), tokens.view(-1, 1)), [1])

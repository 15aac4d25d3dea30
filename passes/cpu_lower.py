"""The cpu target's kernels: latent attention (lower_paged_attention_to_cpu) and decompressed attention
(lower_attention_to_cpu) onto mla_graph.cpu_kernels."""
from __future__ import annotations

import torch
from torch.fx import GraphModule

import mla_graph.cpu_kernels  # noqa: F401  (registers torch.ops.mla_cpu)

from .base import PassResult, graph_pass, no_ops
from .graph_utils import call
from .rewrite import Rule, rewrite

mla, mla_cpu = torch.ops.mla, torch.ops.mla_cpu
RULE = "paged latent attention -> per-request GEMMs"


@graph_pass(ensures=[no_ops(torch.ops.mla.paged_attention.default)])
def lower_paged_attention_to_cpu(gm: GraphModule) -> PassResult:
    """Every mla.paged_attention -> mla_cpu.paged_attention (same arguments, same meaning).

        o = mla.paged_attention(ql[T,N,L], q_pe[T,N,R], latent[NB,BS,1,L], rope[NB,BS,1,R], bt, qsl, seq_lens, s)
      ->
        o = mla_cpu.paged_attention(ql, q_pe, latent, rope, bt, qsl, seq_lens, s)

    The reference kernel gathers each request's blocks and runs two float32 einsums; the cpu kernel
    (mla_graph.cpu_kernels) reads the same blocks into two GEMMs with the keys as the tall side and
    float32 scores, converting bf16 keys in cache-sized chunks. Every call is lowered: decode (one
    token per request) and the absorbed part of a mixed batch alike, since the kernel keeps the
    causal mask within a request's new tokens.
    """
    return rewrite(gm, [TO_CPU_KERNEL])


TO_CPU_KERNEL = Rule(RULE, mla.paged_attention.default,
                     emit=lambda g, n: call(g, mla_cpu.paged_attention.default, *n.args, **n.kwargs))


ATTENTION_RULE = "decompressed attention -> causal row blocks"


@graph_pass(ensures=[no_ops(torch.ops.mla.attention.default)])
def lower_attention_to_cpu(gm: GraphModule) -> PassResult:
    """Every mla.attention (the decompressed form the cost model kept for prompts) -> mla_cpu.attention.

        o = mla.attention(q[T,N,Dq], k[B,S,Nk,Dq], v[B,S,Nk,Dv], qsl, seq_lens, s)
      ->
        o = mla_cpu.attention(q, k, v, qsl, seq_lens, s)

    Same meaning: the kernel runs each request's causal attention in blocks of query rows over the
    keys each block sees, scale and mask inside the score GEMM, in float32 as the reference does.
    """
    return rewrite(gm, [TO_CPU_ATTENTION])


TO_CPU_ATTENTION = Rule(ATTENTION_RULE, mla.attention.default,
                        emit=lambda g, n: call(g, mla_cpu.attention.default, *n.args, **n.kwargs))

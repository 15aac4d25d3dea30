"""lower_paged_attention_to_cpu: latent attention onto the cpu target's GEMM kernel."""
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

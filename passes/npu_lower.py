"""Lowering to torch_npu kernels (emulated on hosts without an NPU; same schemas).

Order matters: the cache-write fusion must see mla.rms_norm and mla.rope before they are
lowered one by one, so it runs first.
"""
from __future__ import annotations

import operator
from typing import Callable

import torch
from torch.fx import GraphModule, Node

from mla_graph.contract import find_input, graph_meta, input_of
from mla_graph.inputs import graph_input
from mla_graph.npu import limits
from mla_graph.npu.limits import Violation

from .base import PassResult, graph_pass
from .cost_model import EVERY_ATTENTION_COSTED, choose_attention_form
from .graph_utils import add_constant, add_input, call, fake_empty, first_user_position, new_symbol, same_size
from .mla_patterns import DECOMPRESSED, KV_CACHE_WRITE, val
from .rewrite import Match, Rule, Skip, emit_traced, rewrite

aten, mla = torch.ops.aten, torch.ops.mla
MASK_SIZE = 2048  # FIA sparse modes 2-4 take a compressed 2048 x 2048 triu(1) mask


def _npu():
    return torch.ops.npu


# The inputs these kernels read beside the definition's, declared in mla_graph.inputs (how a call
# provides each, once per step): rope cos / sin rows, lengths as host lists, context slots.
ROPE_COS, ROPE_SIN = graph_input("rope_cos"), graph_input("rope_sin")
SEQ_LENS_LIST, QUERY_ENDS_LIST = graph_input("seq_lens_list"), graph_input("query_ends_list")
CONTEXT_ENDS_LIST, CONTEXT_SLOTS = graph_input("context_ends_list"), graph_input("context_slots")


def _rope_cos_sin(gm: GraphModule, positions: Node, table: Node) -> tuple[Node, Node]:
    """cos, sin [T, 1, 1, R] as the NPU rope kernels take them (each half-table repeated twice).
    They are graph inputs computed once per call outside the graph (as vllm-ascend builds them once
    per step), not per-layer kernels; every rope in the graph shares them."""
    T = val(positions).shape[0]
    R = val(table).shape[-1]
    fake = fake_empty(gm, T, 1, 1, R, dtype=graph_meta(gm).dtype)
    return add_input(gm, ROPE_COS, fake), add_input(gm, ROPE_SIN, fake)


@graph_pass()
def fuse_kv_rmsnorm_rope_cache(gm: GraphModule) -> PassResult:
    """rms_norm + rope + cache write of the latent -> one npu_kv_rmsnorm_rope_cache_v2 (PA).

        c, k = split(kv, [L, R]); c = mla.rms_norm(c, g, eps); k = mla.rope(k, pos, table)
        mla.cache_write(c, k, latent_cache, rope_cache, slots)
      ->
        npu.npu_kv_rmsnorm_rope_cache_v2(kv[T,1,1,L+R], g, cos, sin, slots, rope_cache, latent_cache,
                                         epsilon=eps, cache_mode='PA')     # writes both caches
    """
    return rewrite(gm, [KV_WRITE_V2], dead_code=True)


def kv_cache_write_emit(emit: Callable[..., Node | None]) -> Callable[..., Node | None]:
    """The emit of a latent cache-write fusion (over KV_CACHE_WRITE): `emit(graph, match,
    kv[T,1,1,L+R], cos, sin)` builds what replaces the write."""
    def emit_write(g, m: Match) -> Node | None:
        cos, sin = _rope_cos_sin(g.owning_module, m.positions, m.table)
        return emit(g, m, call(g, aten.view.default, m.kv, [-1, 1, 1, val(m.kv).shape[-1]]), cos, sin)
    return emit_write


def _write_v2(g, m: Match, kv4: Node, cos: Node, sin: Node) -> None:
    call(g, _npu().npu_kv_rmsnorm_rope_cache_v2.default, kv4, m.gamma, cos, sin, m.slots, m.rope_cache,
         m.latent_cache, epsilon=m.eps, cache_mode="PA")


KV_WRITE_V2 = Rule("rmsnorm+rope+cache write", KV_CACHE_WRITE, emit=kv_cache_write_emit(_write_v2))


@graph_pass()
def lower_rope(gm: GraphModule) -> PassResult:
    """mla.rope on per-head q -> npu_interleave_rope (fp16/bf16; GE's InterleaveRope takes no fp32),
    else the same rotation in aten ops.

        q_pe = mla.rope(x[T, N, R], positions, table)
      ->  q_pe = view(npu.npu_interleave_rope(view(x, [T, N, 1, R]), cos, sin), [T, N, R])
      |   x0, x1 = x[..., 0::2], x[..., 1::2]; c, s = cos[..., :R/2], sin[..., :R/2]
          q_pe = cat(x0 * c - x1 * s, x1 * c + x0 * s)                               # fp32 models
    """
    return rewrite(gm, [Q_ROPE, Q_ROPE_ATEN])


def _interleave_rope(g, n: Node) -> Node:
    x, positions, table = n.args
    _, N, R = val(x).shape
    cos, sin = _rope_cos_sin(g.owning_module, positions, table)
    x4 = call(g, aten.view.default, call(g, aten.clone.default, x), [-1, N, 1, R])
    return call(g, aten.view.default, call(g, _npu().npu_interleave_rope.default, x4, cos, sin), [-1, N, R])


def _rope_aten(g, n: Node) -> Node:
    x, positions, table = n.args
    cos, sin = _rope_cos_sin(g.owning_module, positions, table)
    return emit_traced(g, rope_in_aten, [x, cos, sin, val(x).shape[-1]])


Q_ROPE = Rule("q rope", mla.rope.default, emit=_interleave_rope,
              check=lambda n: val(n).dim() == 3 and val(n).dtype in limits.INTERLEAVE_ROPE_DTYPES)
Q_ROPE_ATEN = Rule("q rope (aten: no InterleaveRope for this dtype)", mla.rope.default, emit=_rope_aten,
                   check=lambda n: val(n).dim() == 3 and val(n).dtype not in limits.INTERLEAVE_ROPE_DTYPES)


def rope_in_aten(x, cos, sin, R: int):
    """Interleaved rope of x [T, N, R] with the NPU layout's cos / sin [T, 1, 1, R] (each half repeated)."""
    half = R // 2
    x0, x1 = aten.slice.Tensor(x, -1, 0, R, 2), aten.slice.Tensor(x, -1, 1, R, 2)
    c = aten.slice.Tensor(cos.view(-1, 1, R), -1, 0, half)
    s = aten.slice.Tensor(sin.view(-1, 1, R), -1, 0, half)
    return torch.cat([x0 * c - x1 * s, x1 * c + x0 * s], -1)


# by hand: a traced call would drop eps where it equals the schema's default (the dispatcher strips
# trailing default arguments), and the graph would no longer say which eps it uses
RMS_NORM = Rule("rms_norm", mla.rms_norm.default,
                emit=lambda g, n: call(g, operator.getitem, call(g, _npu().npu_rms_norm.default, *n.args), 0))


@graph_pass()
def lower_rms_norm(gm: GraphModule) -> PassResult:
    """mla.rms_norm(x, g, eps) -> npu.npu_rms_norm(x, g, eps)[0]."""
    return rewrite(gm, [RMS_NORM])


def _mask(gm: GraphModule) -> Node:
    existing = next((n for n in gm.graph.nodes if n.op == "get_attr" and n.target == "fia_causal_mask"), None)
    if existing is not None:
        return existing
    mask = torch.ones(MASK_SIZE, MASK_SIZE, dtype=torch.bool).triu(1)
    node = add_constant(gm, "fia_causal_mask", mask, first_user_position(gm))
    graph_meta(gm).derived_constants[node.target] = None   # independent of the weights
    return node


def input_part(node: Node) -> str | None:
    """'decode' / 'prefill' when `node` is an input of one part of a split mixed batch
    (passes.split_mixed), else None: inputs a pass adds for that attention are of the same part."""
    inp = input_of(node)
    return inp.part if inp is not None else None


def paged_fia_limits(ql: Node, q_pe: Node, latent_cache: Node, bt: Node) -> list[Violation]:
    """Why FIA's MLA mode cannot take this latent attention (hard limits only): it must be one
    token per request (a prefill chunk can exceed MLA mode's 16 query tokens)."""
    T, N, L = val(ql).shape
    violations = limits.hard(limits.fia_mla(
        dtype=val(ql).dtype, num_heads=N, latent=L, rope=val(q_pe).shape[-1], kv_heads=1,
        block_size=val(latent_cache).shape[1], paged=True, query_tokens=[1]))
    if not same_size(T, val(bt).shape[0]):
        violations.append(limits.Violation(
            limits.FIA, "query tokens per request", "a prefill chunk's length (known per call only)",
            f"1..{limits.MLA_MAX_QUERY_TOKENS}", "MLA constraints, L8176"))
    return violations


@graph_pass()
def lower_paged_attention(gm: GraphModule) -> PassResult:
    """mla.paged_attention of one new token per request -> npu_fused_infer_attention_score in MLA
    mode (BNSD) over the paged cache, where the kernel's documented limits admit it (limits.fia_mla);
    other calls are left for lower_paged_attention_to_aten.

        o = mla.paged_attention(ql[B,N,L], q_pe, latent_cache, rope_cache, bt, qsl, seq_lens, s)
      ->  o = view(npu.npu_fused_infer_attention_score(view(ql,[B,N,1,L]), view(latent_cache,[NB,1,BS,L]),
              ..., query_rope=.., key_rope=.., block_table=bt, actual_seq_lengths_kv=seq_lens_list,
              num_heads=N, num_key_value_heads=1, input_layout='BNSD', block_size=BS)[0], [B,N,L])
    """
    return rewrite(gm, [PAGED_FIA])


def _fia_admits(n: Node) -> bool | Skip:
    why_not = paged_fia_limits(*n.args[:2], n.args[2], n.args[4])
    return Skip(f"{n.name}: not FIA: {why_not[0].message()}") if why_not else True


def _paged_fia(g, n: Node) -> Node:
    ql, q_pe, latent_cache, rope_cache, bt, qsl, seq_lens, scale = n.args
    _, N, L = val(ql).shape
    R = val(q_pe).shape[-1]
    BS = val(latent_cache).shape[1]
    kv_lens = add_input(g.owning_module, SEQ_LENS_LIST, [], input_part(seq_lens))
    k = call(g, aten.view.default, latent_cache, [-1, 1, BS, L])
    kr = call(g, aten.view.default, rope_cache, [-1, 1, BS, R])
    q = call(g, aten.view.default, ql, [-1, N, 1, L])
    qr = call(g, aten.view.default, q_pe, [-1, N, 1, R])
    fia = call(g, _npu().npu_fused_infer_attention_score.default, q, k, k, query_rope=qr, key_rope=kr,
               actual_seq_lengths_kv=kv_lens, block_table=bt, num_heads=N, scale=scale,
               input_layout="BNSD", num_key_value_heads=1, sparse_mode=0, block_size=BS)
    return call(g, aten.view.default, call(g, operator.getitem, fia, 0), [-1, N, L])


PAGED_FIA = Rule("paged latent attention (BNSD)", mla.paged_attention.default, emit=_paged_fia, check=_fia_admits)


@graph_pass(ensures=[EVERY_ATTENTION_COSTED])
def choose_npu_attention_form(gm: GraphModule) -> PassResult:
    """choose_attention_form, with the decompressed form only where FIA's TND layout admits it
    (bf16, 192/128 head dims, 8..128 heads): elsewhere absorbed, the form every dtype can run."""
    return choose_attention_form(gm, admissible=lambda m: "; ".join(v.message() for v in context_fia_limits(m)))


def context_fia_limits(m) -> list[Violation]:
    """Why FIA's TND layout cannot take this decompressed attention (hard limits only)."""
    _, N, P = val(m.q_nope).shape
    return limits.hard(limits.fia_tnd(dtype=val(m.q_nope).dtype, num_heads=N, num_kv_heads=N,
                                      qk_dim=P + val(m.q_pe).shape[-1], v_dim=m.sizes[1], sparse_mode=3,
                                      has_mask=True))


@graph_pass()
def lower_context_attention(gm: GraphModule) -> PassResult:
    """Decompressed attention over each request's whole context -> FIA TND, sparse_mode 3.

        lin = aten.linear(mla.gather_paged(latent_cache, bt), w)  ->  K/V [B, S, N, .] (padded)
        o = mla.attention(q, k, v, qsl, seq_lens, s)
      ->
        ctx = aten.index_select(view(latent_cache, [-1, L]), 0, context_slots)   # [C, L] ragged
        o = npu.npu_fused_infer_attention_score(q[T,N,P+R], k[C,N,P+R], v[C,N,V], atten_mask,
              actual_seq_lengths=query_ends_list, actual_seq_lengths_kv=context_ends_list,
              input_layout='TND', sparse_mode=3)[0]
    """
    return rewrite(gm, [CONTEXT_FIA], dead_code=True)


def _tnd_admits(m: Match) -> bool:
    why_not = context_fia_limits(m)
    if why_not:
        raise ValueError(f"{m.node.name}: decompressed attention the FIA TND kernel cannot take: "
                         f"{why_not[0].message()}; choose_attention_form should have chosen 'absorbed'")
    return True


def _context_fia(g, m: Match) -> Node:
    gm = g.owning_module
    _, N, P = val(m.q_nope).shape
    V = m.sizes[1]
    L, R = val(m.latent_cache).shape[-1], val(m.rope_cache).shape[-1]
    part = input_part(m.seq_lens)
    slots = find_input(gm, CONTEXT_SLOTS, part) or add_input(gm, CONTEXT_SLOTS, _fake_slots(gm), part)
    mask = _mask(gm)
    q_ends = add_input(gm, QUERY_ENDS_LIST, [], part)
    kv_ends = add_input(gm, CONTEXT_ENDS_LIST, [], part)
    lat = call(g, aten.index_select.default, call(g, aten.view.default, m.latent_cache, [-1, L]), 0, slots)
    rope = call(g, aten.index_select.default, call(g, aten.view.default, m.rope_cache, [-1, R]), 0, slots)
    kv = call(g, aten.view.default, call(g, aten.linear.default, lat, m.w_kv_b), [-1, N, P + V])
    parts = call(g, aten.split_with_sizes.default, kv, [P, V], -1)
    k_nope, v = call(g, operator.getitem, parts, 0), call(g, operator.getitem, parts, 1)
    k_pe = call(g, aten.expand.default, call(g, aten.view.default, rope, [-1, 1, R]), [-1, N, R])
    k = call(g, aten.cat.default, [k_nope, k_pe], -1)
    q = call(g, aten.cat.default, [m.q_nope, m.q_pe], -1)
    fia = call(g, _npu().npu_fused_infer_attention_score.default, q, k, v, atten_mask=mask,
               actual_seq_lengths=q_ends, actual_seq_lengths_kv=kv_ends, num_heads=N, scale=m.scale,
               input_layout="TND", num_key_value_heads=N, sparse_mode=3)
    return call(g, operator.getitem, fia, 0)


CONTEXT_FIA = Rule("decompressed context attention (TND)", DECOMPRESSED, emit=_context_fia, check=_tnd_admits)


def _fake_slots(gm: GraphModule) -> torch.Tensor:
    C = new_symbol(gm, "C", 29)
    return fake_empty(gm, C, dtype=torch.int64)

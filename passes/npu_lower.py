"""Lowering to torch_npu kernels (emulated on hosts without an NPU; same schemas).

Order matters: the cache-write fusion must see mla.rms_norm and mla.rope before they are
lowered one by one, so it runs first.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.fx import GraphModule, Node

from mla_graph.contract import find_input, graph_meta, input_of
from mla_graph.inputs import graph_input
from mla_graph.npu import limits
from mla_graph.npu.limits import Violation

from .base import PassResult, graph_pass
from .cost_model import EVERY_ATTENTION_COSTED, choose_attention_form
from .graph_utils import add_constant, add_input, fake_empty, first_user_position, new_symbol, same_size
from .mla_patterns import DECOMPRESSED, KV_CACHE_WRITE, val
from .recording import emit_recorded
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


def kv_cache_write_emit(kernel: Callable, then: Callable[..., None] | None = None) -> Callable[..., None]:
    """The emit of a latent cache-write fusion (over KV_CACHE_WRITE): `kernel(kv, gamma, cos, sin,
    slots, rope_cache, latent_cache, eps)`, recorded as written, replaces the write; `then(graph,
    match, its result)` does what else the fusion needs."""
    def emit_write(g, m: Match) -> None:
        cos, sin = _rope_cos_sin(g.owning_module, m.positions, m.table)
        out = emit_recorded(g, kernel, m.kv, m.gamma, cos, sin, m.slots, m.rope_cache, m.latent_cache, m.eps)
        if then is not None:
            then(g, m, out)
    return emit_write


def kv_write_v2(kv, gamma, cos, sin, slots, rope_cache, latent_cache, eps: float) -> None:
    _npu().npu_kv_rmsnorm_rope_cache_v2.default(kv.view(-1, 1, 1, kv.shape[-1]), gamma, cos, sin, slots, rope_cache,
                                                latent_cache, epsilon=eps, cache_mode="PA")


KV_WRITE_V2 = Rule("rmsnorm+rope+cache write", KV_CACHE_WRITE, emit=kv_cache_write_emit(kv_write_v2))


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
    cos, sin = _rope_cos_sin(g.owning_module, positions, table)
    return emit_recorded(g, interleave_rope, x, cos, sin)


def interleave_rope(x, cos, sin):
    _, N, R = x.shape
    return _npu().npu_interleave_rope.default(x.clone().view(-1, N, 1, R), cos, sin).view(-1, N, R)


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


def npu_rms_norm(x, gamma, eps: float):
    return _npu().npu_rms_norm.default(x, gamma, eps)[0]


# recorded, not traced: a trace would drop eps where it equals the schema's default (the dispatcher
# strips trailing default arguments), and the graph would no longer say which eps it uses
RMS_NORM = Rule("rms_norm", mla.rms_norm.default, emit=lambda g, n: emit_recorded(g, npu_rms_norm, *n.args))


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
    violations = fia_mla_limits(ql, q_pe, latent_cache)
    if not same_size(val(ql).shape[0], val(bt).shape[0]):
        violations.append(limits.Violation(
            limits.FIA, "query tokens per request", "a prefill chunk's length (known per call only)",
            f"1..{limits.MLA_MAX_QUERY_TOKENS}", "MLA constraints, L8176"))
    return violations


@graph_pass()
def lower_paged_attention(gm: GraphModule) -> PassResult:
    """mla.paged_attention of one new token per request -> npu_fused_infer_attention_score in MLA
    mode (BNSD) over the paged cache, where the kernel's documented limits admit it (limits.fia_mla);
    in a multi_decode graph (1..16 new tokens per request, the metadata's contract) MLA mode in the
    TND layout with its causal mask, as vllm-ascend runs MTP; other calls are left for
    lower_paged_attention_to_aten.

        o = mla.paged_attention(ql[B,N,L], q_pe, latent_cache, rope_cache, bt, qsl, seq_lens, s)
      ->  o = view(npu.npu_fused_infer_attention_score(view(ql,[B,N,1,L]), view(latent_cache,[NB,1,BS,L]),
              ..., query_rope=.., key_rope=.., block_table=bt, actual_seq_lengths_kv=seq_lens_list,
              num_heads=N, num_key_value_heads=1, input_layout='BNSD', block_size=BS)[0], [B,N,L])
      multi_decode (ql [T,N,L]):
          o = npu.npu_fused_infer_attention_score(ql, view(latent_cache,[NB,1,BS,L]), ..., query_rope=q_pe,
              key_rope=.., atten_mask=triu(1) 2048x2048, block_table=bt, actual_seq_lengths=query_ends_list,
              actual_seq_lengths_kv=seq_lens_list, input_layout='TND', sparse_mode=3, ...)[0]
    """
    multi_token = graph_meta(gm).phase in ("multi_decode", "multi_mixed")
    return rewrite(gm, [PAGED_FIA, PAGED_FIA_TND] if multi_token else [PAGED_FIA])


def _fia_admits(n: Node) -> bool | Skip:
    why_not = paged_fia_limits(*n.args[:2], n.args[2], n.args[4])
    return Skip(f"{n.name}: not FIA: {why_not[0].message()}") if why_not else True


def _paged_fia(g, n: Node) -> Node:
    ql, q_pe, latent_cache, rope_cache, bt, qsl, seq_lens, scale = n.args
    kv_lens = add_input(g.owning_module, SEQ_LENS_LIST, [], input_part(seq_lens))
    return emit_recorded(g, paged_fia, ql, q_pe, latent_cache, rope_cache, bt, kv_lens, scale)


def paged_keys(latent_cache, rope_cache):
    """The caches as FIA's paged keys: (blocks, 1 KV head, block_size, D) views of the latent (key and
    value) and of the rope part (key_rope); and the block size."""
    BS = latent_cache.shape[1]
    return (latent_cache.view(-1, 1, BS, latent_cache.shape[-1]), rope_cache.view(-1, 1, BS, rope_cache.shape[-1]),
            BS)


def paged_fia(ql, q_pe, latent_cache, rope_cache, bt, kv_lens, scale: float):
    _, N, L = ql.shape
    R = q_pe.shape[-1]
    k, kr, BS = paged_keys(latent_cache, rope_cache)
    out = _npu().npu_fused_infer_attention_score.default(
        ql.view(-1, N, 1, L), k, k, query_rope=q_pe.view(-1, N, 1, R), key_rope=kr, actual_seq_lengths_kv=kv_lens,
        block_table=bt, num_heads=N, scale=scale, input_layout="BNSD", num_key_value_heads=1, sparse_mode=0,
        block_size=BS)
    return out[0].view(-1, N, L)


PAGED_FIA = Rule("paged latent attention (BNSD)", mla.paged_attention.default, emit=_paged_fia, check=_fia_admits)


def fia_mla_limits(ql: Node, q_pe: Node, latent_cache: Node) -> list[Violation]:
    """Why FIA's MLA mode cannot take this latent attention, its query tokens per request aside (hard
    limits: dtype, dims, block size; a multi-token decode's 1..16 tokens per request are the metadata's
    contract, checked per call by the kernel)."""
    _, N, L = val(ql).shape
    return limits.hard(limits.fia_mla(
        dtype=val(ql).dtype, num_heads=N, latent=L, rope=val(q_pe).shape[-1], kv_heads=1,
        block_size=val(latent_cache).shape[1], paged=True))


def _tnd_fia_admits(n: Node) -> bool | Skip:
    if graph_meta(n.graph.owning_module).phase == "multi_mixed" and input_part(n.args[6]) != "decode":
        return Skip(f"{n.name}: a multi_mixed batch's prefill part (TND MLA mode is for decodes of 1..16 tokens)")
    why_not = fia_mla_limits(n.args[0], n.args[1], n.args[2])
    return Skip(f"{n.name}: not FIA: {why_not[0].message()}") if why_not else True


def _paged_fia_tnd(g, n: Node) -> Node:
    ql, q_pe, latent_cache, rope_cache, bt, qsl, seq_lens, scale = n.args
    gm, part = g.owning_module, input_part(seq_lens)
    q_ends = find_input(gm, QUERY_ENDS_LIST, part) or add_input(gm, QUERY_ENDS_LIST, [], part)
    kv_lens = find_input(gm, SEQ_LENS_LIST, part) or add_input(gm, SEQ_LENS_LIST, [], part)
    return emit_recorded(g, paged_fia_tnd, ql, q_pe, latent_cache, rope_cache, bt, _mask(gm), q_ends, kv_lens, scale)


def paged_fia_tnd(ql, q_pe, latent_cache, rope_cache, bt, mask, q_ends, kv_lens, scale: float):
    N = ql.shape[1]
    k, kr, BS = paged_keys(latent_cache, rope_cache)
    out = _npu().npu_fused_infer_attention_score.default(
        ql, k, k, query_rope=q_pe, key_rope=kr, atten_mask=mask, actual_seq_lengths=q_ends,
        actual_seq_lengths_kv=kv_lens, block_table=bt, num_heads=N, scale=scale, input_layout="TND",
        num_key_value_heads=1, sparse_mode=3, block_size=BS)
    return out[0]


PAGED_FIA_TND = Rule("paged latent attention of several tokens per request (TND)", mla.paged_attention.default,
                     emit=_paged_fia_tnd, check=_tnd_fia_admits)


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
    part = input_part(m.seq_lens)
    slots = find_input(gm, CONTEXT_SLOTS, part) or add_input(gm, CONTEXT_SLOTS, _fake_slots(gm), part)
    mask = _mask(gm)
    q_ends = add_input(gm, QUERY_ENDS_LIST, [], part)
    kv_ends = add_input(gm, CONTEXT_ENDS_LIST, [], part)
    return emit_recorded(g, context_fia, m.q_nope, m.q_pe, m.latent_cache, m.rope_cache, m.w_kv_b, slots, mask,
                         q_ends, kv_ends, m.sizes[1], m.scale)


def context_fia(q_nope, q_pe, latent_cache, rope_cache, w_kv_b, slots, mask, q_ends, kv_ends, V: int, scale: float):
    _, N, P = q_nope.shape
    L, R = latent_cache.shape[-1], rope_cache.shape[-1]
    latent = aten.index_select.default(latent_cache.view(-1, L), 0, slots)               # [C, L] ragged
    rope = aten.index_select.default(rope_cache.view(-1, R), 0, slots)
    parts = aten.split_with_sizes.default(aten.linear.default(latent, w_kv_b).view(-1, N, P + V), [P, V], -1)
    k_nope, v = parts[0], parts[1]
    k = aten.cat.default([k_nope, aten.expand.default(rope.view(-1, 1, R), [-1, N, R])], -1)
    q = aten.cat.default([q_nope, q_pe], -1)
    out = _npu().npu_fused_infer_attention_score.default(
        q, k, v, atten_mask=mask, actual_seq_lengths=q_ends, actual_seq_lengths_kv=kv_ends, num_heads=N, scale=scale,
        input_layout="TND", num_key_value_heads=N, sparse_mode=3)
    return out[0]


CONTEXT_FIA = Rule("decompressed context attention (TND)", DECOMPRESSED, emit=_context_fia, check=_tnd_admits)


def _fake_slots(gm: GraphModule) -> torch.Tensor:
    C = new_symbol(gm, "C", 29)
    return fake_empty(gm, C, dtype=torch.int64)

"""Passes for the torchair (GE graph mode) decode target: converter-backed, functional cache updates.

GE takes cache updates only in functional form: a kernel returns the updated cache and a final
`aten.copy_` into the graph input becomes an Assign/ref output. So the fused writers here are
the functional variants, later readers are redirected to their outputs, and the copies back are
added at the end.
"""
from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from mla_graph.contract import SEQ_LENS, find_input, graph_meta, input_of
from mla_graph.inputs import graph_input
from mla_graph.npu import limits, npu_backend
from mla_graph.npu.limits import Violation

from .base import Invariant, PassResult, graph_pass
from .graph_utils import add_constant, add_input, call, fake_empty, first_user_position, remove_input
from .mla_patterns import KV_CACHE_WRITE, _is, val
from .npu_lower import QUERY_ENDS_LIST, SEQ_LENS_LIST, _npu, _rope_cos_sin, kv_cache_write_emit
from .recording import emit_recorded
from .rewrite import Match, Pattern, Rule, Skip, rewrite, traced

aten, mla = torch.ops.aten, torch.ops.mla


def _writeback(gm: GraphModule, cache: Node, updated: Node, after: Node) -> None:
    """Nodes after `after` read `updated` instead of `cache`; `cache` gets `updated` copied in last."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for user in list(cache.users):
        if order[user] > order[after]:
            user.replace_input_with(cache, updated)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        call(gm.graph, aten.copy_.default, cache, updated)


def _writeback_order(gm: GraphModule) -> list[tuple[Node | None, str]]:
    """Around each functional cache write and its `copy_` back into the graph input: one copy back
    per cache; nothing reads the cache input after the write that updated it (it would read the
    old contents: read the write's output) or after the copy back (GE's Assign happens at the end)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    out, seen = [], set()
    for copy in [n for n in gm.graph.nodes if _is(n, aten.copy_.default) and n.args[0].op == "placeholder"]:
        cache, updated = copy.args[0], copy.args[1]
        if cache in seen:
            out.append((copy, f"{cache.name} is copied back twice"))
        seen.add(cache)
        writer = updated.args[0] if _is(updated, operator.getitem) else updated
        for user in cache.users:
            if user is copy or user is writer:
                continue
            if order[user] > order[copy]:
                out.append((user, f"{user.name} reads {cache.name} after its copy back ({copy.name})"))
            elif order[user] > order[writer]:
                out.append((user, f"{user.name} reads {cache.name} as it was before {writer.name} updated it; "
                                  f"it must read {updated.name}"))
    return out


WRITEBACK_ORDER = Invariant("functional cache writes: readers use the update, one copy back, last", _writeback_order)


@Pattern
def MLA_PROLOG(hidden, w_qa, q_gamma, q_eps, w_qb, q_shape, q_sizes, w_uk, positions, table, w_kva, kv_sizes,
               kv_gamma, kv_eps, latent_cache, rope_cache, slots, block_table, query_start_loc, seq_lens, scale):
    """The decode prolog feeding an absorbed mla.paged_attention (q_a -> norm -> q_b -> W_UK and q
    rope) and the latent cache write from kv_a of the same hidden states at the same positions."""
    q = aten.view.default(aten.linear.default(mla.rms_norm.default(aten.linear.default(hidden, w_qa), q_gamma, q_eps),
                                              w_qb), q_shape)
    q_nope, q_pe = aten.split_with_sizes.default(q, q_sizes, -1)
    ql = aten.permute.default(aten.bmm.default(aten.permute.default(q_nope, [1, 0, 2]), w_uk), [1, 0, 2])
    attention = mla.paged_attention.default(ql, mla.rope.default(q_pe, positions, table), latent_cache, rope_cache,
                                            block_table, query_start_loc, seq_lens, scale)
    c, k = aten.split_with_sizes.default(aten.linear.default(hidden, w_kva), kv_sizes, -1)
    write = mla.cache_write.default(mla.rms_norm.default(c, kv_gamma, kv_eps), mla.rope.default(k, positions, table),
                                    latent_cache, rope_cache, slots)
    return attention, write


def prolog_limits(m: Match) -> list[Violation]:
    """Why npu_mla_prolog_v3 cannot run this prolog (its documented limits; hard ones only): bf16
    tokens, hidden 7168/7680/6144 (not DeepSeek-V2's 5120), q_lora 1536, latent 512, nope 128,
    rope 64, block size 16 or 128."""
    w_uk = val(m.w_uk)                                      # [N, P, L]
    return limits.hard(limits.mla_prolog(
        token_dtype=val(m.hidden).dtype, hidden=val(m.hidden).shape[-1], q_lora=val(m.w_qa).shape[0],
        heads=w_uk.shape[0], latent=w_uk.shape[2], nope=w_uk.shape[1], rope=val(m.table).shape[-1],
        block_size=val(m.latent_cache).shape[1], cache_mode="PA_BSND"))


def transposed(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] nn.Linear weight -> the [in, out] matrix the prolog kernel takes, a new tensor."""
    with torch.no_grad():
        return weight.detach().t().contiguous()


def prolog_weight(weight: torch.Tensor) -> torch.Tensor:
    """The [in, out] weight in FRACTAL_NZ, the format the prolog takes weight_dq, weight_uq_qr and
    weight_dkv_kr in (L9605-L9608): cast once here, as vllm-ascend does with npu_format_cast(w, 29).
    torch_npu's cast gets a contiguous [in, out] matrix, as vllm-ascend hands it; the emulated cast
    (a copy into the new layout) takes the transposed view and makes it in that one copy."""
    with torch.no_grad():
        w = transposed(weight) if npu_backend() == "torch_npu" else weight.detach().t()
        return _npu().npu_format_cast(w, limits.ACL_FORMAT_FRACTAL_NZ)


@graph_pass(ensures=[WRITEBACK_ORDER])
def fuse_mla_prolog(gm: GraphModule) -> PassResult:
    """The whole absorbed decode prolog -> npu_mla_prolog_v3_functional (configs with q_lora).

        q = linear(rms_norm(linear(h, q_a)), q_b) -> split -> bmm(q_nope, w_uk), mla.rope(q_pe)
        c, k = split(linear(h, kv_a)); mla.cache_write(rms_norm(c), mla.rope(k), latent, rope, slots)
        o = mla.paged_attention(ql, q_pe, latent, rope, ...)
      ->
        p = npu.npu_mla_prolog_v3_functional(h, w_dq, w_uq_qr, w_uk, w_dkv_kr, g_cq, g_ckv, sin, cos,
                                             latent, rope, cache_index=slots, cache_mode='PA_BSND')
        o = mla.paged_attention(p[0], p[1], p[5], p[6], ...); copy_(latent, p[5]); copy_(rope, p[6])

    Fires only where the kernel's documented limits hold (prolog_limits; otherwise the functional
    cache writer below takes the write). Weights are handed over as [in, out] FRACTAL_NZ constants
    cut once here (the user's weights are not touched).
    """
    return rewrite(gm, [PROLOG], dead_code=True)


def _prolog_admits(m: Match) -> bool | Skip:
    if not all(getattr(m, w).op == "get_attr" for w in ("w_qa", "w_qb", "w_kva", "w_uk")):
        return Skip(f"{m.node.name}: the prolog's weights are not constants; not fused")
    why_not = prolog_limits(m)
    return Skip(f"{m.node.name}: not fused: {why_not[0].message()}") if why_not else True


def _prolog(g, m: Match) -> Node:
    gm, attn = g.owning_module, m.node
    anchor = first_user_position(gm)
    consts = {}
    derived = graph_meta(gm).derived_constants
    for key, name in (("w_qa", "prolog_w_dq"), ("w_qb", "prolog_w_uq_qr"), ("w_kva", "prolog_w_dkv_kr")):
        source = getattr(m, key).target
        consts[key] = add_constant(gm, f"{attn.name}_{name}", prolog_weight(gm.get_parameter(source)), anchor)
        consts[key].meta["npu_format"] = "FRACTAL_NZ"
        derived[consts[key].target] = (source, prolog_weight)   # replayed per layer by lower_layers
    cos, sin = _rope_cos_sin(gm, m.positions, m.table)
    query, query_rope, kv_out, kr_out = emit_recorded(
        g, mla_prolog, m.hidden, consts["w_qa"], consts["w_qb"], m.w_uk, consts["w_kva"], m.q_gamma, m.kv_gamma,
        cos, sin, m.latent_cache, m.rope_cache, m.slots, m.q_eps, m.kv_eps)
    attn.args = (query, query_rope, *attn.args[2:])
    g.erase_node(next(n for n in m.nodes if n.target is mla.cache_write.default))
    prolog = kv_out.args[0]          # the kernel node (kv_out reads its output 5)
    _writeback(gm, m.latent_cache, kv_out, prolog)
    _writeback(gm, m.rope_cache, kr_out, prolog)
    return attn     # edited in place


def mla_prolog(hidden, w_dq, w_uq_qr, w_uk, w_dkv_kr, q_gamma, kv_gamma, cos, sin, latent_cache, rope_cache, slots,
               q_eps: float, kv_eps: float):
    """The prolog kernel, recorded as written: query, query rope, updated latent and rope caches."""
    R = cos.shape[-1]
    cos2, sin2 = cos.view(-1, R), sin.view(-1, R)
    out = _npu().npu_mla_prolog_v3_functional.default(
        hidden, w_dq, w_uq_qr, w_uk, w_dkv_kr, q_gamma, kv_gamma, sin2, cos2, latent_cache, rope_cache,
        cache_index=slots, rmsnorm_epsilon_cq=q_eps, rmsnorm_epsilon_ckv=kv_eps, cache_mode="PA_BSND")
    return out[0], out[1], out[5], out[6]


PROLOG = Rule("mla prolog", MLA_PROLOG, emit=_prolog, check=_prolog_admits,
              missed="no full q_lora prolog in front (e.g. q_proj config); not fused")


@graph_pass(ensures=[WRITEBACK_ORDER])
def fuse_kv_rmsnorm_rope_cache_functional(gm: GraphModule) -> PassResult:
    """rms_norm + rope + cache write -> npu_kv_rmsnorm_rope_cache (v1: returns the updated caches).

        mla.cache_write(mla.rms_norm(c), mla.rope(k), latent, rope, slots)
      ->
        r = npu.npu_kv_rmsnorm_rope_cache(kv[T,1,1,L+R], g, cos, sin, slots, rope, latent, cache_mode='PA')
        (later readers use r[1] / r[0]); copy_(latent, r[1]); copy_(rope, r[0])
    """
    return rewrite(gm, [KV_WRITE_FUNCTIONAL], dead_code=True)


def kv_write_functional(kv, gamma, cos, sin, slots, rope_cache, latent_cache, eps: float):
    """The v1 kernel, recorded as written: the updated rope and latent caches."""
    out = _npu().npu_kv_rmsnorm_rope_cache.default(kv.view(-1, 1, 1, kv.shape[-1]), gamma, cos, sin, slots,
                                                   rope_cache, latent_cache, epsilon=eps, cache_mode="PA")
    return out[0], out[1]


def _write_back_caches(g, m: Match, updated: tuple[Node, Node]) -> None:
    k_new, c_new = updated
    _writeback(g.owning_module, m.latent_cache, c_new, c_new)
    _writeback(g.owning_module, m.rope_cache, k_new, k_new)


KV_WRITE_FUNCTIONAL = Rule("rmsnorm+rope+cache write (functional)", KV_CACHE_WRITE,
                           emit=kv_cache_write_emit(kv_write_functional, then=_write_back_caches))


@graph_pass(ensures=[WRITEBACK_ORDER])
def decompose_linear(gm: GraphModule) -> PassResult:
    """aten.linear has no GE converter (torchair's AOT step would decompose it): mm with the
    transposed weight (a view, no kernel).

        y = aten.linear(x[T, K], w[N, K])  ->  y = aten.mm(x, aten.t(w))
    """
    return rewrite(gm, [LINEAR_TO_MM])


LINEAR_TO_MM = Rule("linear -> mm", aten.linear.default,
                    check=lambda n: len(n.args) == 2 and val(n.args[0]).dim() == 2,
                    emit=traced(lambda x, w: torch.mm(x, w.t())))


# FIA's lengths as the int64 device tensor GE's FusedInferAttentionScore takes (torchair's air FIA
# converter does not cast), converted on the host once per step, so the graph carries no cast kernel
SEQ_LENS_INT64 = graph_input("seq_lens_int64")   # declared in mla_graph.inputs
QUERY_ENDS_INT64 = graph_input("query_ends_int64")
# host-list input -> its device tensor form (query ends: the TND layout of a multi_decode graph)
_LENGTH_TENSORS = {SEQ_LENS_LIST: SEQ_LENS_INT64, QUERY_ENDS_LIST: QUERY_ENDS_INT64}
_LENGTH_KEYS = ("actual_seq_lengths", "actual_seq_lengths_kv")


@graph_pass()
def lengths_as_tensors(gm: GraphModule) -> PassResult:
    """FIA with host-list lengths -> torchair's air FIA, which takes them as device tensors: a
    list of ints in a compiled graph is either a value guard (recompiles every step) or a
    data-dependent read (no GE converter); the tensor form is what GE graph mode runs.

        o = npu.npu_fused_infer_attention_score(q, k, v, actual_seq_lengths_kv=seq_lens_list, ...)
      ->  o = air.npu_fused_infer_attention_score(q, k, v, actual_seq_lengths_kv=seq_lens_int64, ...)
    """
    lists = [n for n in gm.graph.nodes if input_of(n) in _LENGTH_TENSORS]
    result = rewrite(gm, [Rule("FIA lengths as tensors", _npu().npu_fused_infer_attention_score.default,
                               emit=_air_fia, check=_tensor_forms)])
    for node in lists:   # the host lists the rewrites left unused
        if not node.users:
            remove_input(gm, node)
    return result


def _tensor_forms(n: Node) -> bool | Skip:
    given = [n.kwargs[k] for k in _LENGTH_KEYS if n.kwargs.get(k) is not None]
    if all(isinstance(x, Node) and input_of(x) in _LENGTH_TENSORS for x in given):
        return True
    return Skip(f"{n.name}: a length list with no tensor form; left as is")


def _air_fia(g, n: Node) -> Node:
    gm = g.owning_module
    kwargs = dict(n.kwargs)
    for key in _LENGTH_KEYS:
        if kwargs.get(key) is not None:
            seq_lens = find_input(gm, SEQ_LENS)
            tensor_form = _LENGTH_TENSORS[input_of(kwargs[key])]
            kwargs[key] = find_input(gm, tensor_form) or add_input(
                gm, tensor_form, fake_empty(gm, val(seq_lens).shape[0], dtype=torch.int64))
    return call(g, torch.ops.air.npu_fused_infer_attention_score.default, *n.args, **kwargs)


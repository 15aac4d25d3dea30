"""Each pass of the TARGETS pipelines alone, on a small graph built by hand (tests/pass_graphs.py).

Before: only the nodes the pass's pattern anchors on and what it needs, with symbolic token,
request and block counts as capture() makes them. Expected: written here, independently of the
pass: the whole graph after it, built by hand or traced from torch code and compared as structure
(assert_structural_equal: the same calls on the same arguments in the same order), besides op
counts and the arguments the new nodes take. Numerics: the graph after the pass against the graph before it on the same random
inputs (caches pre-filled with NaN or random data, compared too), through mla_graph.testing.check_pass
(so the verifier and the pass's requires/ensures run as well). Each pass also gets a case where it
must not fire.

The pipeline-level tests of the same passes on captured layers are in test_npu_passes.py,
test_torchair_passes.py, test_cleanup_passes.py and test_cpu_kernels.py.
"""
from __future__ import annotations

import operator
from collections import Counter

import pytest
import torch
from torch.testing import FileCheck

from mla_graph.contract import graph_meta
from mla_graph.npu import ensure_npu_ops
from mla_graph.targets import TARGETS, check_fully_lowered
from mla_graph.npu.air_ops import ensure_air_ops
from pass_graphs import GraphBuilder, inputs_for, nodes, ops, paged_batch, placeholders, rope_rows, rope_table
from mla_graph.passes import PassManager, PassVerificationError, eliminate_dead_code, remove_noop_views
from mla_graph.passes.absorb import absorb_kv_weights
from mla_graph.passes.attention_fallback import FALLBACK_RULE, lower_paged_attention_to_aten
from mla_graph.passes.cost_model import choose_attention_form
from mla_graph.passes.cpu_lower import (ATTENTION_RULE as CPU_ATTENTION_RULE, RULE as CPU_RULE, lower_attention_to_cpu,
                                        lower_paged_attention_to_cpu)
from mla_graph.passes.multistream import insert_multistream_scopes
from mla_graph.passes.npu_lower import (choose_npu_attention_form, fuse_kv_rmsnorm_rope_cache, lower_context_attention,
                              lower_paged_attention, lower_rms_norm, lower_rope)
from mla_graph.passes.page import page_latent_attention
from mla_graph.passes.split_mixed import split_mixed_batch
from mla_graph.testing import assert_structural_equal, check_pass, structural_diff
from mla_graph.passes.torchair_lower import (decompose_linear, fuse_kv_rmsnorm_rope_cache_functional, fuse_mla_prolog,
                                   lengths_as_tensors)

aten, mla = torch.ops.aten, torch.ops.mla
f32, bf16, f16, i32, i64 = torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.int64
SCALE = 0.35
EPS = 1e-6
# Tiny dims: heads, qk_nope, rope, latent, v (v != qk_nope), block size.
N, P, R, L, V, BS = 2, 4, 4, 8, 6, 4
FIA = "npu.npu_fused_infer_attention_score.default"


@pytest.fixture(scope="module", autouse=True)
def _ops():
    ensure_npu_ops()
    ensure_air_ops()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype=f32, seed=0, std=1.0, mean=0.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=_gen(seed)) * std + mean).to(dtype)


def _count(gm, *names: str) -> dict[str, int]:
    """How often each named op is called in gm (0 included)."""
    have = Counter(ops(gm))
    return {name: have[name] for name in names}


def _unchanged(pass_fn, gm):
    """The pass must report nothing and leave gm.code as it was (check_pass holds it to that)."""
    return check_pass(pass_fn, gm, compare_numerics=False, expect_changed=False, expect_matches=0).record


def _result(record) -> tuple[bool, int, dict]:
    return record.changed, record.matches, record.matches_by_rule


# ---- the graphs ---------------------------------------------------------------------------------

def _sizes(b: GraphBuilder, phase: str):
    B = b.sym("num_reqs", 3)
    T = B if phase == "decode" else b.sym("num_tokens", 7)
    return T, B, b.sym("num_blocks", 13), b.sym("max_blocks", 5)


def _cache_inputs(b: GraphBuilder, NB, B, MB, *, latent: int, rope: int, block: int, dtype):
    return (b.input("latent_cache", (NB, block, 1, latent), dtype), b.input("rope_cache", (NB, block, 1, rope), dtype),
            b.input("block_table", (B, MB), i32), b.input("seq_lens", (B,), i32),
            b.input("query_start_loc", (B + 1,), i32))


def decompressed_graph(phase="decode", *, dtype=f32, heads=N, nope=P, rope=R, latent=L, v_dim=V, block=BS,
                       kv_b: torch.Tensor | None = None, weight_as_input=False):
    """mla.attention over K/V decompressed from the gathered latent (the captured definition's form):

        lin = linear(gather_paged(latent_cache, bt), kv_b_proj_weight); k_nope, v = split(view(lin), [P, V])
        out = mla.attention(cat(q_nope, q_pe), cat(k_nope, expand(view(gather_paged(rope_cache, bt)))), v, ...)
    """
    b = GraphBuilder(phase=phase, dtype=dtype, block_size=block, num_heads=heads)
    T, B, NB, MB = _sizes(b, phase)
    q_nope, q_pe = b.input("q_nope", (T, heads, nope), dtype), b.input("q_pe", (T, heads, rope), dtype)
    latent_cache, rope_cache, bt, seq_lens, qsl = _cache_inputs(b, NB, B, MB, latent=latent, rope=rope,
                                                                block=block, dtype=dtype)
    if weight_as_input:
        w = b.input("kv_b_proj_weight", (heads * (nope + v_dim), latent), dtype)
    else:
        w = b.weight("kv_b_proj_weight", kv_b)
    return b.finish(_decompressed(b, q_nope, q_pe, latent_cache, rope_cache, bt, qsl, seq_lens, w, heads=heads,
                                  nope=nope, rope=rope, v_dim=v_dim))


def _decompressed(b: GraphBuilder, q_nope, q_pe, latent_cache, rope_cache, bt, qsl, seq_lens, w, *, heads=N, nope=P,
                  rope=R, v_dim=V, attention=mla.attention.default):
    """decompressed_graph's attention over the given inputs (each part of a split batch is one)."""
    lat = b.op(mla.gather_paged.default, latent_cache, bt)
    lin = b.op(aten.linear.default, lat, w)
    rows, S = b.op(aten.sym_size.int, lin, 0), b.op(aten.sym_size.int, lin, 1)
    parts = b.op(aten.split_with_sizes.default, b.op(aten.view.default, lin, [rows, S, heads, nope + v_dim]),
                 [nope, v_dim], -1)
    k_nope, v = b.op(operator.getitem, parts, 0), b.op(operator.getitem, parts, 1)
    k_pe = b.op(aten.expand.default, b.op(aten.view.default, b.op(mla.gather_paged.default, rope_cache, bt),
                                          [rows, S, 1, rope]), [rows, S, heads, rope])
    k = b.op(aten.cat.default, [k_nope, k_pe], -1)
    q = b.op(aten.cat.default, [q_nope, q_pe], -1)
    return b.op(attention, q, k, v, qsl, seq_lens, SCALE)


def decompressed_values(requests, *, dtype=f32, heads=N, nope=P, rope=R, latent=L, block=BS, num_blocks=12,
                        seed=0, nan_outside=True):
    batch = paged_batch(requests, block_size=block, num_blocks=num_blocks, latent=latent, rope=rope, dtype=dtype,
                        seed=seed, nan_outside=nan_outside)
    T = sum(t for t, _ in requests)
    batch.update(q_nope=_randn(T, heads, nope, dtype=dtype, seed=seed + 1),
                 q_pe=_randn(T, heads, rope, dtype=dtype, seed=seed + 2))
    return batch


def latent_graph(phase="decode", *, dtype=f32, v_from_other_table=False):
    """The absorbed form before paging: latent MQA over the gathered context.

        o = mla.attention(cat(ql, q_pe), unsqueeze(cat(gather(latent), gather(rope)), 2),
                          unsqueeze(gather(latent), 2), qsl, seq_lens, s)
    """
    b = GraphBuilder(phase=phase, dtype=dtype, block_size=BS)
    T, B, NB, MB = _sizes(b, phase)
    ql, q_pe = b.input("ql", (T, N, L), dtype), b.input("q_pe", (T, N, R), dtype)
    latent_cache, rope_cache, bt, seq_lens, qsl = _cache_inputs(b, NB, B, MB, latent=L, rope=R, block=BS, dtype=dtype)
    other = b.input("other_block_table", (B, MB), i32) if v_from_other_table else bt
    lat = b.op(mla.gather_paged.default, latent_cache, bt)
    rope = b.op(mla.gather_paged.default, rope_cache, bt)
    k = b.op(aten.unsqueeze.default, b.op(aten.cat.default, [lat, rope], -1), 2)
    v_lat = b.op(mla.gather_paged.default, latent_cache, other) if v_from_other_table else lat
    v = b.op(aten.unsqueeze.default, v_lat, 2)
    q = b.op(aten.cat.default, [ql, q_pe], -1)
    return b.finish(b.op(mla.attention.default, q, k, v, qsl, seq_lens, SCALE))


def paged_graph(phase="decode", *, dtype=f32, latent=L, rope=R, block=BS, heads=N):
    """o = mla.paged_attention(ql, q_pe, latent_cache, rope_cache, bt, qsl, seq_lens, s)"""
    b = GraphBuilder(phase=phase, dtype=dtype, block_size=block, num_heads=heads)
    T, B, NB, MB = _sizes(b, phase)
    ql, q_pe = b.input("ql", (T, heads, latent), dtype), b.input("q_pe", (T, heads, rope), dtype)
    latent_cache, rope_cache, bt, seq_lens, qsl = _cache_inputs(b, NB, B, MB, latent=latent, rope=rope,
                                                                block=block, dtype=dtype)
    return b.finish(b.op(mla.paged_attention.default, ql, q_pe, latent_cache, rope_cache, bt, qsl, seq_lens, SCALE))


def paged_values(requests, *, dtype=f32, latent=L, rope=R, block=BS, heads=N, num_blocks=12, seed=0,
                 nan_outside=True):
    batch = paged_batch(requests, block_size=block, num_blocks=num_blocks, latent=latent, rope=rope, dtype=dtype,
                        seed=seed, nan_outside=nan_outside)
    T = sum(t for t, _ in requests)
    batch.update(ql=_randn(T, heads, latent, dtype=dtype, seed=seed + 1),
                 q_pe=_randn(T, heads, rope, dtype=dtype, seed=seed + 2))
    return batch


MAX_POS = 64


def kv_write_graph(*, dtype=f32, extra_user=False, reader=True, latent=L, rope=R, block=BS, raw_latent_user=False):
    """The latent cache write of the definition, and an attention that reads the caches after it:

        c, k = split(kv, [L, R]); mla.cache_write(mla.rms_norm(c, g, eps), mla.rope(k, pos, table), ...)
        o = mla.paged_attention(ql, q_pe, latent_cache, rope_cache, ...)
    """
    b = GraphBuilder(phase="decode", dtype=dtype, block_size=block)
    T, B, NB, MB = _sizes(b, "decode")
    kv = b.input("kv", (T, latent + rope), dtype)
    positions = b.input("positions", (T,), i64)
    slots = b.input("slot_mapping", (T,), i64)
    ql, q_pe = b.input("ql", (T, N, latent), dtype), b.input("q_pe", (T, N, rope), dtype)
    latent_cache, rope_cache, bt, seq_lens, qsl = _cache_inputs(b, NB, B, MB, latent=latent, rope=rope,
                                                                block=block, dtype=dtype)
    gamma = b.weight("kv_a_layernorm_weight", _randn(latent, dtype=dtype, seed=7, std=0.2, mean=1.0))
    table = b.weight("cos_sin", rope_table(MAX_POS, rope).to(dtype), parameter=False)
    parts = b.op(aten.split_with_sizes.default, kv, [latent, rope], -1)
    normed = b.op(mla.rms_norm.default, b.op(operator.getitem, parts, 0), gamma, EPS)
    roped = b.op(mla.rope.default, b.op(operator.getitem, parts, 1), positions, table)
    b.op(mla.cache_write.default, normed, roped, latent_cache, rope_cache, slots)
    outputs = []
    if reader:
        outputs.append(b.op(mla.paged_attention.default, ql, q_pe, latent_cache, rope_cache, bt, qsl, seq_lens, SCALE))
    if extra_user:
        outputs.append(b.op(aten.neg.default, normed))
    if raw_latent_user:                             # the latent before its norm, read elsewhere too
        outputs.append(b.op(aten.neg.default, normed.args[0]))
    return b.finish(tuple(outputs))


def kv_write_values(requests, *, dtype=f32, latent=L, rope=R, block=BS, seed=0):
    """Random cache contents everywhere (the write must land in its slots and nowhere else)."""
    batch = paged_values(requests, dtype=dtype, latent=latent, rope=rope, block=block, seed=seed, nan_outside=False)
    T = sum(t for t, _ in requests)
    batch["kv"] = _randn(T, latent + rope, dtype=dtype, seed=seed + 3)
    batch.update(rope_rows(rope_table(MAX_POS, rope), batch["positions"], dtype))
    return batch


# ---- remove_noop_views / eliminate_dead_code ------------------------------------------------------

def _views_graph():
    b = GraphBuilder()
    T = b.sym("num_tokens", 7)
    x = b.input("x", (T, 8))
    rows = b.op(aten.sym_size.int, x, 0)
    same = b.op(aten.view.default, x, [rows, 8])                      # no-op: [T, 8] -> [T, 8]
    split = b.op(aten.reshape.default, same, [rows, 2, 4])            # real
    kept = b.op(aten.expand.default, split, [rows, 2, 4])             # no-op
    alias = b.op(aten.alias.default, kept)                            # no-op
    flat = b.op(aten._unsafe_view.default, alias, [rows, 8])          # real (3-d -> 2-d)
    return b.finish(b.op(aten.mul.Tensor, flat, 2.0))


def test_remove_noop_views_on_symbolic_shapes():
    gm = _views_graph()
    check = check_pass(remove_noop_views, gm, make_inputs=inputs_for({"x": _randn(5, 8)}))
    assert _result(check.record) == (True, 3, {"view": 1, "expand": 1, "alias": 1})
    assert ops(gm) == ["aten.sym_size.int", "aten.reshape.default", "aten._unsafe_view.default", "aten.mul.Tensor"]
    reshape = nodes(gm, aten.reshape.default)[0]
    assert reshape.args[0].op == "placeholder"                         # reads x itself now
    e = GraphBuilder()                # Before/Expected: the real views alone, on x itself
    T = e.sym("num_tokens", 7)
    x = e.input("x", (T, 8))
    rows = e.op(aten.sym_size.int, x, 0)
    flat = e.op(aten._unsafe_view.default, e.op(aten.reshape.default, x, [rows, 2, 4]), [rows, 8])
    assert_structural_equal(gm, e.finish(e.op(aten.mul.Tensor, flat, 2.0)))


def test_remove_noop_views_does_not_fire_on_real_views():
    b = GraphBuilder()
    T = b.sym("num_tokens", 7)
    x = b.input("x", (T, 8))
    y = b.op(aten.view.default, x, [b.op(aten.sym_size.int, x, 0), 2, 4])
    gm = b.finish(b.op(aten.expand.default, b.op(aten.unsqueeze.default, y, 0), [3, -1, 2, 4]))
    _unchanged(remove_noop_views, gm)


def test_eliminate_dead_code_erases_unused_chains_keeps_writes():
    b = GraphBuilder()
    T, B, NB, MB = _sizes(b, "decode")
    normed, roped = b.input("normed", (T, L)), b.input("roped", (T, R))
    latent_cache, rope_cache = b.input("latent_cache", (NB, BS, 1, L)), b.input("rope_cache", (NB, BS, 1, R))
    slots = b.input("slot_mapping", (T,), i64)
    b.op(aten.neg.default, b.op(aten.exp.default, normed))           # a dead chain of two
    b.op(mla.cache_write.default, normed, roped, latent_cache, rope_cache, slots)    # no users, but a write
    gm = b.finish(b.op(aten.mul.Tensor, roped, 3.0))
    values = paged_batch([(1, 5), (1, 2), (1, 9)], block_size=BS, num_blocks=8, latent=L, rope=R, dtype=f32,
                         nan_outside=False)
    values.update(normed=_randn(3, L, seed=4), roped=_randn(3, R, seed=5))
    check = check_pass(eliminate_dead_code, gm, make_inputs=inputs_for(values), compare_mutated=True)
    assert check.mutated == ["latent_cache", "rope_cache"]
    assert _result(check.record) == (True, 2, {"dead node": 2})
    assert ops(gm) == ["mla.cache_write.default", "aten.mul.Tensor"]


def test_eliminate_dead_code_does_not_fire_without_dead_nodes():
    gm = _views_graph()
    _unchanged(eliminate_dead_code, gm)


# ---- choose_attention_form / choose_npu_attention_form ---------------------------------------------

def _kv_b(dtype=f32, heads=N, nope=P, v_dim=V, latent=L, seed=11, std=0.3):
    return _randn(heads * (nope + v_dim), latent, dtype=dtype, seed=seed, std=std)


@pytest.mark.parametrize("phase, form", [("decode", "absorbed"), ("prefill", "decompressed")])
def test_choose_attention_form_records_the_form_in_meta_only(phase, form):
    """Decode (1 token over 4096 of context) absorbs; prefill (2048 new tokens of 2048) decompresses:
    at these dims absorbed attention's (L+R+L)-wide MQA costs more than decompressing once."""
    gm = decompressed_graph(phase, kv_b=_kv_b())
    requests = [(1, 5), (1, 9), (1, 2)] if phase == "decode" else [(3, 5), (2, 2), (2, 9)]
    check = check_pass(choose_attention_form, gm, make_inputs=inputs_for(decompressed_values(requests)))
    assert _result(check.record) == (False, 0, {})
    [attention] = nodes(gm, mla.attention.default)
    assert attention.meta["mla_attention_form"] == graph_meta(gm).attention_form == form
    [note] = check.record.notes
    assert f"({phase})" in note and note.endswith(f"-> {form}")


def test_choose_attention_form_costs_each_part_of_a_split_batch_at_its_own_batch():
    gm = decompressed_graph("mixed", kv_b=_kv_b())
    [attention] = nodes(gm, mla.attention.default)
    attention.meta["mla_batch_part"] = "decode"         # the phase says mixed; the part says decode
    record = PassManager([choose_attention_form]).run(gm).records[0]
    assert attention.meta["mla_attention_form"] == "absorbed" and "(decode)" in record.notes[0]


def test_choose_attention_form_falls_back_to_absorbed_where_decompressed_is_not_admitted():
    gm = decompressed_graph("prefill", kv_b=_kv_b())
    record = choose_attention_form(gm, admissible=lambda m: "no kernel for you")
    assert _result(record) == (False, 0, {})
    assert graph_meta(gm).attention_form == "absorbed"
    assert record.notes[0].endswith("-> absorbed (decompressed not admitted: no kernel for you)")


def test_choose_attention_form_does_not_fire_without_decompressed_attention():
    gm = latent_graph("prefill")
    record = _unchanged(choose_attention_form, gm)
    assert record.notes == [] and "mla_attention_form" not in gm.meta


# FIA TND's dims (bf16, 8 heads, q/k 192, v 128) with DeepSeek's 512 latent: shapes only, never run.
TND = dict(heads=8, nope=128, rope=64, v_dim=128, latent=512, block=16)


@pytest.mark.parametrize("dtype, form, why", [(bf16, "decompressed", None), (f32, "absorbed", "query.dtype=torch.float32"),
                                              (f16, "absorbed", "query.dtype=torch.float16")],
                         ids=["bf16", "fp32", "fp16"])
def test_choose_npu_attention_form_keeps_decompressed_only_where_fia_tnd_admits_it(dtype, form, why):
    gm = decompressed_graph("prefill", dtype=dtype, kv_b=torch.zeros(8 * 256, 512, dtype=dtype), **TND)
    record = check_pass(choose_npu_attention_form, gm, compare_numerics=False).record
    assert _result(record) == (False, 0, {})
    assert nodes(gm, mla.attention.default)[0].meta["mla_attention_form"] == form
    [note] = record.notes
    assert ("not admitted" in note) == (why is not None)
    if why:
        assert why in note


def test_choose_npu_attention_form_does_not_fire_without_decompressed_attention():
    gm = paged_graph("decode")
    assert _unchanged(choose_npu_attention_form, gm).notes == []
    assert "mla_attention_form" not in gm.meta


# ---- split_mixed_batch ----------------------------------------------------------------------------

MIXED = [(1, 5), (1, 3), (3, 6), (2, 2)]       # two decodes first, then two prefill chunks


def _parts(values: dict, num_decodes: int) -> dict:
    """The decode_* / prefill_* inputs of a split batch: each part's rows, query starts rebased to 0."""
    out = dict(values)
    for part, rows in (("decode", slice(0, num_decodes)), ("prefill", slice(num_decodes, None))):
        qsl = values["query_start_loc"][rows.start: (rows.stop + 1) if rows.stop else None]
        out.update({f"{part}_block_table": values["block_table"][rows], f"{part}_seq_lens": values["seq_lens"][rows],
                    f"{part}_query_start_loc": qsl - qsl[0]})
    return out


def test_split_mixed_batch():
    gm = decompressed_graph("mixed", kv_b=_kv_b())
    inputs = placeholders(gm)
    check = check_pass(split_mixed_batch, gm, make_inputs=inputs_for(_parts(decompressed_values(MIXED), 2)))
    assert _result(check.record) == (True, 1, {"split mixed attention": 1})
    added = [f"{p}_{n}" for p in ("decode", "prefill") for n in ("block_table", "seq_lens", "query_start_loc")]
    assert placeholders(gm) == inputs + added and graph_meta(gm).input_names == inputs + added
    assert _count(gm, "mla.attention.default", "mla.gather_paged.default", "aten.linear.default",
                  "aten.slice.Tensor", "aten.cat.default") == {
        "mla.attention.default": 2, "mla.gather_paged.default": 4, "aten.linear.default": 2,
        "aten.slice.Tensor": 4, "aten.cat.default": 5}            # q and k of each part, and the output
    by_part = {n.meta["mla_batch_part"]: n for n in nodes(gm, mla.attention.default)}
    for part, attention in by_part.items():
        q, k, v, qsl, seq_lens, scale = attention.args
        assert (qsl.name, seq_lens.name, scale) == (f"{part}_query_start_loc", f"{part}_seq_lens", SCALE)
        q_nope = q.args[0][0]
        assert q_nope.target is aten.slice.Tensor and q_nope.args[0].name == "q_nope"
    # the cut is the decode part's request count, read from the graph (not a baked-in number)
    decode_slice = by_part["decode"].args[0].args[0][0]
    assert decode_slice.args[3].target is aten.sym_size.int and decode_slice.args[3].args[0].name == "decode_seq_lens"
    [out] = [n for n in gm.graph.nodes if n.op == "output"]
    assert out.args[0].target is aten.cat.default and out.args[0].args[0] == [by_part["decode"], by_part["prefill"]]
    assert "num_decodes" in graph_meta(gm).symbols.values()      # a new size symbol, named for dumps
    # Before/Expected: the part's rows of q sliced at the decode count, each part the whole attention
    # over its own inputs, the outputs concatenated
    e = GraphBuilder(phase="mixed", dtype=f32, block_size=BS, num_heads=N)
    T, B, NB, MB = _sizes(e, "mixed")
    q_nope, q_pe = e.input("q_nope", (T, N, P), f32), e.input("q_pe", (T, N, R), f32)
    latent_cache, rope_cache, *_ = _cache_inputs(e, NB, B, MB, latent=L, rope=R, block=BS, dtype=f32)
    parts = {part: (e.input(f"{part}_block_table", (n, MB), i32), e.input(f"{part}_seq_lens", (n,), i32),
                    e.input(f"{part}_query_start_loc", (n + 1,), i32))
             for part, n in (("decode", e.sym("num_decodes", 2)), ("prefill", e.sym("num_prefills", 2)))}
    w = e.weight("kv_b_proj_weight", _kv_b())
    decodes, tokens = e.op(aten.sym_size.int, parts["decode"][1], 0), e.op(aten.sym_size.int, q_nope, 0)
    outs = []
    for (bt, seq_lens, qsl), (start, end) in zip(parts.values(), ((0, decodes), (decodes, tokens))):
        rows = [e.op(aten.slice.Tensor, x, 0, start, end) for x in (q_nope, q_pe)]
        outs.append(_decompressed(e, *rows, latent_cache, rope_cache, bt, qsl, seq_lens, w))
    assert_structural_equal(gm, e.finish(e.op(aten.cat.default, outs)))


@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_split_mixed_batch_does_not_fire_outside_the_mixed_phase(phase):
    gm = decompressed_graph(phase, kv_b=_kv_b())
    record = _unchanged(split_mixed_batch, gm)
    assert "only mixed batches are split" in record.notes[0] and graph_meta(gm).input_names == placeholders(gm)


def test_split_mixed_batch_does_not_split_a_part_again():
    gm = decompressed_graph("mixed", kv_b=_kv_b())
    nodes(gm, mla.attention.default)[0].meta["mla_batch_part"] = "prefill"
    _unchanged(split_mixed_batch, gm)


# ---- absorb_kv_weights ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, phase, requests", [(f32, "decode", [(1, 5), (1, 9), (1, 2)]),
                                                    (f32, "prefill", [(3, 5), (2, 2), (2, 9)]),
                                                    (bf16, "decode", [(1, 5), (1, 9), (1, 2)])],
                         ids=["fp32-decode", "fp32-prefill", "bf16-decode"])
def test_absorb_kv_weights(dtype, phase, requests):
    weight = _kv_b(dtype)
    pristine = weight.clone()
    gm = decompressed_graph(phase, dtype=dtype, kv_b=weight)
    check = check_pass(absorb_kv_weights, gm, make_inputs=inputs_for(decompressed_values(requests, dtype=dtype)))
    assert _result(check.record) == (True, 1, {"absorb decompressed attention": 1})
    assert _count(gm, "aten.linear.default", "aten.bmm.default", "mla.attention.default", "mla.gather_paged.default",
                  "aten.split_with_sizes.default") == {
        "aten.linear.default": 0, "aten.bmm.default": 2, "mla.attention.default": 1, "mla.gather_paged.default": 2,
        "aten.split_with_sizes.default": 0}
    FileCheck().check("torch.ops.aten.bmm.default").check("torch.ops.mla.attention.default") \
        .check("torch.ops.aten.bmm.default").run(gm.code)
    [attention] = nodes(gm, mla.attention.default)
    q, k, v = (attention.args[i].meta["val"] for i in range(3))
    assert q.shape[-2:] == (N, L + R) and k.shape[-2:] == (1, L + R) and v.shape[-2:] == (1, L)   # MQA in latent space
    # W_UK [N, P, L] and W_UV [N, L, V], cut from kv_b_proj's rows per head [k_nope (P) | v (V)]
    per_head = pristine.view(N, P + V, L)
    [name] = [n.target for n in gm.graph.nodes if n.op == "get_attr" and n.target.endswith("_w_uk")]
    w_uk, w_uv = getattr(gm, name), getattr(gm, name[: -len("_w_uk")] + "_w_uv")
    assert torch.equal(w_uk, per_head[:, :P, :]) and torch.equal(w_uv, per_head[:, P:, :].transpose(1, 2))
    assert torch.equal(weight, pristine)                      # the weight itself is not touched
    derived = graph_meta(gm).derived_constants
    assert {k: v[0] for k, v in derived.items()} == {name: "kv_b_proj_weight",
                                                     name[: -len("_w_uk")] + "_w_uv": "kv_b_proj_weight"}
    # Before/Expected: q_nope through W_UK, MQA in latent space over the gathered caches, out through W_UV
    e = GraphBuilder(phase=phase, dtype=dtype, block_size=BS, num_heads=N)
    T, B, NB, MB = _sizes(e, phase)
    q_nope, q_pe = e.input("q_nope", (T, N, P), dtype), e.input("q_pe", (T, N, R), dtype)
    latent_cache, rope_cache, bt, seq_lens, qsl = _cache_inputs(e, NB, B, MB, latent=L, rope=R, block=BS, dtype=dtype)
    w_uk = e.weight("attention_default_w_uk", per_head[:, :P, :], parameter=False)
    w_uv = e.weight("attention_default_w_uv", per_head[:, P:, :].transpose(1, 2), parameter=False)
    lat, rope = e.op(mla.gather_paged.default, latent_cache, bt), e.op(mla.gather_paged.default, rope_cache, bt)
    k = e.op(aten.unsqueeze.default, e.op(aten.cat.default, [lat, rope], -1), 2)
    v = e.op(aten.unsqueeze.default, lat, 2)

    def per_head_matmul(x, w):       # [T, N, a] x [N, a, b] -> [T, N, b]
        return e.op(aten.permute.default, e.op(aten.bmm.default, e.op(aten.permute.default, x, [1, 0, 2]), w), [1, 0, 2])
    o = e.op(mla.attention.default, e.op(aten.cat.default, [per_head_matmul(q_nope, w_uk), q_pe], -1), k, v, qsl,
             seq_lens, SCALE)
    assert_structural_equal(gm, e.finish(per_head_matmul(o, w_uv)))


def test_absorb_kv_weights_does_not_fire_where_decompressed_won():
    gm = decompressed_graph("prefill", kv_b=_kv_b())
    nodes(gm, mla.attention.default)[0].meta["mla_attention_form"] = "decompressed"
    graph_meta(gm).attention_form = "absorbed"                 # the node's own form wins over the graph's
    assert "'decompressed'" in _unchanged(absorb_kv_weights, gm).notes[0]


def test_absorb_kv_weights_does_not_fire_on_a_weight_that_is_not_a_constant():
    gm = decompressed_graph("decode", weight_as_input=True)
    assert "not a constant" in _unchanged(absorb_kv_weights, gm).notes[0]


def test_absorb_kv_weights_does_not_fire_on_latent_attention():
    assert _unchanged(absorb_kv_weights, latent_graph()).notes == []


# ---- page_latent_attention -------------------------------------------------------------------------

@pytest.mark.parametrize("phase, requests", [("decode", [(1, 5), (1, 9), (1, 2)]), ("prefill", [(3, 5), (2, 2), (2, 9)])])
def test_page_latent_attention(phase, requests):
    gm = latent_graph(phase)
    check = check_pass(page_latent_attention, gm, make_inputs=inputs_for(paged_values(requests)))
    assert _result(check.record) == (True, 1, {"latent attention over gathered blocks": 1})
    assert ops(gm) == ["mla.paged_attention.default"]          # gathers, cats and unsqueezes are gone
    [paged] = nodes(gm, mla.paged_attention.default)
    assert [a.name for a in paged.args[:7]] == ["ql", "q_pe", "latent_cache", "rope_cache", "block_table",
                                                "query_start_loc", "seq_lens"]
    assert paged.args[7] == SCALE
    assert_structural_equal(gm, paged_graph(phase))     # Before/Expected: the one paged attention over the caches


def test_page_latent_attention_does_not_fire_when_values_come_from_another_gather():
    _unchanged(page_latent_attention, latent_graph(v_from_other_table=True))


def test_page_latent_attention_does_not_fire_on_decompressed_attention():
    _unchanged(page_latent_attention, decompressed_graph(kv_b=_kv_b()))


# ---- lower_paged_attention_to_aten / lower_paged_attention_to_cpu ------------------------------------

@pytest.mark.parametrize("phase, requests", [("decode", [(1, 5), (1, 9), (1, 2)]),
                                             ("prefill", [(3, 5), (2, 2), (2, 9)])])
@pytest.mark.parametrize("dtype", [f32, bf16], ids=["fp32", "bf16"])
def test_lower_paged_attention_to_aten(phase, requests, dtype):
    """NaN in every cache slot outside each context: the rows a token may not see are never read into
    its output (the comparison would show a NaN)."""
    gm = paged_graph(phase, dtype=dtype)
    check = check_pass(lower_paged_attention_to_aten, gm,
                       make_inputs=inputs_for(paged_values(requests, dtype=dtype)))
    assert _result(check.record) == (True, 1, {FALLBACK_RULE: 1})
    counts = _count(gm, "mla.paged_attention.default", "aten.bmm.default", "aten._softmax.default",
                    "aten.index_select.default", "aten.masked_fill.Scalar")
    # decode: the block table rows as they are; prefill: rows, query ends, seq_lens picked per token
    assert counts == {"mla.paged_attention.default": 0, "aten.bmm.default": 2, "aten._softmax.default": 1,
                      "aten.index_select.default": 2 if phase == "decode" else 5, "aten.masked_fill.Scalar": 3}
    if phase == "decode":   # Before/Expected: the graph the docstring's formula makes, written as torch code
        assert_structural_equal(gm, _expected_paged_decode_in_aten(dtype))


def _expected_paged_decode_in_aten(dtype):
    """One token per request: the block table's rows as they are; keys past seq_len - 1 masked."""
    from mla_graph.passes.rewrite import emit_traced

    def attention(ql, q_pe, latent_cache, rope_cache, bt, qsl, seq_lens, scale):
        S = bt.shape[1] * BS
        last = seq_lens - 1
        rows = bt.view(-1)
        hidden = aten.arange.start(0, S, dtype=torch.int64).view(1, -1, 1) > last.view(-1, 1, 1)
        c = aten._to_copy.default(latent_cache.index_select(0, rows).view(-1, S, L), dtype=f32).masked_fill(hidden, 0.0)
        k_pe = aten._to_copy.default(rope_cache.index_select(0, rows).view(-1, S, R), dtype=f32).masked_fill(hidden, 0.0)
        q = aten._to_copy.default(torch.cat([ql, q_pe], -1), dtype=f32)
        scores = torch.bmm(q, torch.cat([c, k_pe], -1).transpose(1, 2)) * scale
        p = torch.softmax(scores.masked_fill(hidden.transpose(1, 2), torch.finfo(f32).min), -1)
        return aten._to_copy.default(torch.bmm(p, c), dtype=dtype)

    b = GraphBuilder(phase="decode", dtype=dtype, block_size=BS, num_heads=N)
    T, B, NB, MB = _sizes(b, "decode")
    ql, q_pe = b.input("ql", (T, N, L), dtype), b.input("q_pe", (T, N, R), dtype)
    inputs = _cache_inputs(b, NB, B, MB, latent=L, rope=R, block=BS, dtype=dtype)
    latent_cache, rope_cache, bt, seq_lens, qsl = inputs
    out = emit_traced(b.graph, attention, [ql, q_pe, latent_cache, rope_cache, bt, qsl, seq_lens, SCALE])
    return b.finish(out)


def test_structural_comparison_sees_an_op_an_argument_and_a_literal():
    """The Before/Expected comparison itself: names do not matter; an op, an argument or a literal does."""
    def graph(op=aten.mul.Tensor, swap=False, literal=2.0, name="y"):
        b = GraphBuilder()
        x, y = b.input("x", (4, 6)), b.input(name, (4, 6))
        first, second = (y, x) if swap else (x, y)
        return b.finish(b.op(aten.add.Tensor, b.op(op, first, literal), second))
    assert structural_diff(graph(), graph(name="other")) is None
    assert "target aten.sub.Tensor where aten.mul.Tensor was expected" in structural_diff(graph(aten.sub.Tensor), graph())
    assert "different arguments" in structural_diff(graph(swap=True), graph())
    assert "different arguments" in structural_diff(graph(literal=3.0), graph())
    assert "different arguments" in structural_diff(graph(literal=2), graph())      # 2 is not 2.0
    with pytest.raises(AssertionError, match="(?s)graphs differ: .*--- expected:"):
        assert_structural_equal(graph(aten.sub.Tensor), graph())


@pytest.mark.parametrize("phase, requests", [("decode", [(1, 5), (1, 9), (1, 2)]),
                                             ("prefill", [(3, 5), (0, 4), (2, 9)])])
def test_lower_paged_attention_to_cpu(phase, requests):
    gm = paged_graph(phase)
    check = check_pass(lower_paged_attention_to_cpu, gm, make_inputs=inputs_for(paged_values(requests)))
    assert _result(check.record) == (True, 1, {CPU_RULE: 1})
    assert ops(gm) == ["mla_cpu.paged_attention.default"]
    [fast] = nodes(gm, torch.ops.mla_cpu.paged_attention.default)
    assert [a.name for a in fast.args[:7]] == ["ql", "q_pe", "latent_cache", "rope_cache", "block_table",
                                               "query_start_loc", "seq_lens"] and fast.args[7] == SCALE
    e = GraphBuilder(phase=phase, dtype=f32, block_size=BS, num_heads=N)     # Before/Expected: the one kernel
    T, B, NB, MB = _sizes(e, phase)
    ql, q_pe = e.input("ql", (T, N, L), f32), e.input("q_pe", (T, N, R), f32)
    latent_cache, rope_cache, bt, seq_lens, qsl = _cache_inputs(e, NB, B, MB, latent=L, rope=R, block=BS, dtype=f32)
    assert_structural_equal(gm, e.finish(e.op(torch.ops.mla_cpu.paged_attention.default, ql, q_pe, latent_cache,
                                              rope_cache, bt, qsl, seq_lens, SCALE)))


@pytest.mark.parametrize("phase, requests", [("prefill", [(3, 5), (0, 4), (2, 9)]), ("mixed", MIXED)])
def test_lower_attention_to_cpu(phase, requests):
    """The decompressed attention onto the dense cpu kernel, the rest of the graph as it was; NaN in
    every cache slot outside each context (the padded keys of shorter requests are never read)."""
    gm = decompressed_graph(phase, kv_b=_kv_b())
    check = check_pass(lower_attention_to_cpu, gm, make_inputs=inputs_for(decompressed_values(requests)))
    assert _result(check.record) == (True, 1, {CPU_ATTENTION_RULE: 1})
    e = GraphBuilder(phase=phase, dtype=f32, block_size=BS, num_heads=N)    # Before/Expected: the one op swapped
    T, B, NB, MB = _sizes(e, phase)
    q_nope, q_pe = e.input("q_nope", (T, N, P), f32), e.input("q_pe", (T, N, R), f32)
    latent_cache, rope_cache, bt, seq_lens, qsl = _cache_inputs(e, NB, B, MB, latent=L, rope=R, block=BS, dtype=f32)
    w = e.weight("kv_b_proj_weight", _kv_b())
    assert_structural_equal(gm, e.finish(_decompressed(e, q_nope, q_pe, latent_cache, rope_cache, bt, qsl, seq_lens, w,
                                                       attention=torch.ops.mla_cpu.attention.default)))


@pytest.mark.parametrize("pass_fn", [lower_paged_attention_to_aten, lower_paged_attention_to_cpu])
def test_paged_attention_lowerings_do_not_fire_without_paged_attention(pass_fn):
    _unchanged(pass_fn, latent_graph())


def test_lower_attention_to_cpu_does_not_fire_without_attention():
    _unchanged(lower_attention_to_cpu, paged_graph())


# ---- fuse_kv_rmsnorm_rope_cache / fuse_kv_rmsnorm_rope_cache_functional -----------------------------

DECODE = [(1, 5), (1, 9), (1, 2)]
KV_V2, KV_V1 = "npu.npu_kv_rmsnorm_rope_cache_v2.default", "npu.npu_kv_rmsnorm_rope_cache.default"


@pytest.mark.parametrize("dtype", [f32, bf16], ids=["fp32", "bf16"])
def test_fuse_kv_rmsnorm_rope_cache(dtype):
    """Both caches hold random data everywhere: the fused write must land in the batch's slots only."""
    gm = kv_write_graph(dtype=dtype)
    inputs = placeholders(gm)
    check = check_pass(fuse_kv_rmsnorm_rope_cache, gm, make_inputs=inputs_for(kv_write_values(DECODE, dtype=dtype)),
                       compare_mutated=True)
    assert check.mutated == ["latent_cache", "rope_cache"]
    assert _result(check.record) == (True, 1, {"rmsnorm+rope+cache write": 1})
    assert ops(gm) == ["aten.view.default", KV_V2, "mla.paged_attention.default"]    # split, norm, rope gone
    assert placeholders(gm) == inputs + ["rope_cos", "rope_sin"] == graph_meta(gm).input_names
    [fused] = nodes(gm, torch.ops.npu.npu_kv_rmsnorm_rope_cache_v2.default)
    kv4, gamma, cos, sin, slots, k_cache, ckv_cache = fused.args
    assert kv4.args == (gm.graph.find_nodes(op="placeholder", target="kv")[0], [-1, 1, 1, L + R])
    assert [gamma.target, cos.name, sin.name, slots.name, k_cache.name, ckv_cache.name] == \
        ["kv_a_layernorm_weight", "rope_cos", "rope_sin", "slot_mapping", "rope_cache", "latent_cache"]
    assert fused.kwargs == {"epsilon": EPS, "cache_mode": "PA"}
    assert_structural_equal(gm, _expected_kv_write(dtype, functional=False))


def _expected_kv_write(dtype, *, functional: bool):
    """Before/Expected of both cache-write fusions: kv_write_graph with the split, norm, rope and write
    replaced by one kernel over kv [T, 1, 1, L+R] and the NPU layout's cos / sin rows; the functional
    kernel's updated caches [rope, latent] are what the attention reads, and are copied back last."""
    e = GraphBuilder(phase="decode", dtype=dtype, block_size=BS)
    T, B, NB, MB = _sizes(e, "decode")
    kv, _ = e.input("kv", (T, L + R), dtype), e.input("positions", (T,), i64)
    slots = e.input("slot_mapping", (T,), i64)
    ql, q_pe = e.input("ql", (T, N, L), dtype), e.input("q_pe", (T, N, R), dtype)
    latent_cache, rope_cache, bt, seq_lens, qsl = _cache_inputs(e, NB, B, MB, latent=L, rope=R, block=BS, dtype=dtype)
    cos, sin = e.input("rope_cos", (T, 1, 1, R), dtype), e.input("rope_sin", (T, 1, 1, R), dtype)
    gamma = e.weight("kv_a_layernorm_weight", _randn(L, dtype=dtype, seed=7, std=0.2, mean=1.0))
    kernel = torch.ops.npu.npu_kv_rmsnorm_rope_cache if functional else torch.ops.npu.npu_kv_rmsnorm_rope_cache_v2
    fused = e.op(kernel.default, e.op(aten.view.default, kv, [-1, 1, 1, L + R]), gamma, cos, sin, slots, rope_cache,
                 latent_cache, epsilon=EPS, cache_mode="PA")
    caches = (latent_cache, rope_cache)
    if functional:
        new_rope, new_latent = e.op(operator.getitem, fused, 0), e.op(operator.getitem, fused, 1)
        caches = (new_latent, new_rope)
    out = e.op(mla.paged_attention.default, ql, q_pe, *caches, bt, qsl, seq_lens, SCALE)
    if functional:
        e.op(aten.copy_.default, latent_cache, new_latent)
        e.op(aten.copy_.default, rope_cache, new_rope)
    return e.finish((out,))


@pytest.mark.parametrize("pass_fn", [fuse_kv_rmsnorm_rope_cache, fuse_kv_rmsnorm_rope_cache_functional])
def test_kv_cache_fusions_do_not_fire_when_the_normed_latent_has_another_user(pass_fn):
    gm = kv_write_graph(extra_user=True)
    note = _unchanged(pass_fn, gm).notes[0]   # the matcher's single-use guard (rewrite.exclusive_and_unwritten)
    assert "rms_norm_default of the match is also read by" in note and note.endswith("not rewritten"), note
    assert "rope_cos" not in graph_meta(gm).input_names


@pytest.mark.parametrize("pass_fn, rule", [(fuse_kv_rmsnorm_rope_cache, "rmsnorm+rope+cache write"),
                                           (fuse_kv_rmsnorm_rope_cache_functional,
                                            "rmsnorm+rope+cache write (functional)")])
def test_kv_cache_fusions_fire_when_the_latent_before_its_norm_has_another_reader(pass_fn, rule):
    """Only the normed latent and the roped key must feed nothing but the write: the split before
    them stays for its other reader."""
    gm = kv_write_graph(raw_latent_user=True)
    check = check_pass(pass_fn, gm, make_inputs=inputs_for(kv_write_values(DECODE)), compare_mutated=True)
    assert _result(check.record) == (True, 1, {rule: 1})
    assert nodes(gm, mla.rms_norm.default) == [] and len(nodes(gm, aten.split_with_sizes.default)) == 1


@pytest.mark.parametrize("pass_fn", [fuse_kv_rmsnorm_rope_cache, fuse_kv_rmsnorm_rope_cache_functional])
def test_kv_cache_fusions_do_not_fire_on_a_write_of_unnormed_values(pass_fn):
    gm = kv_write_graph()
    [norm] = nodes(gm, mla.rms_norm.default)
    norm.replace_all_uses_with(norm.args[0])                   # the write now takes the raw latent
    gm.graph.erase_node(norm)
    gm.recompile()
    _unchanged(pass_fn, gm)


def test_fuse_kv_rmsnorm_rope_cache_functional():
    """The functional writer returns the updated caches: the attention after it reads those, and the
    caches get them copied back last."""
    gm = kv_write_graph()
    check = check_pass(fuse_kv_rmsnorm_rope_cache_functional, gm, make_inputs=inputs_for(kv_write_values(DECODE)),
                       compare_mutated=True)
    assert check.mutated == ["latent_cache", "rope_cache"]
    assert _result(check.record) == (True, 1, {"rmsnorm+rope+cache write (functional)": 1})
    assert ops(gm) == ["aten.view.default", KV_V1, "getitem", "getitem", "mla.paged_attention.default",
                       "aten.copy_.default", "aten.copy_.default"]
    [fused] = nodes(gm, torch.ops.npu.npu_kv_rmsnorm_rope_cache.default)
    assert [a.name for a in fused.args[4:]] == ["slot_mapping", "rope_cache", "latent_cache"]
    assert fused.kwargs == {"epsilon": EPS, "cache_mode": "PA"}
    [attention] = nodes(gm, mla.paged_attention.default)
    assert [(a.target, a.args) for a in attention.args[2:4]] == [(operator.getitem, (fused, 1)),
                                                                 (operator.getitem, (fused, 0))]
    copies = {c.args[0].name: c.args[1].args for c in nodes(gm, aten.copy_.default)}
    assert copies == {"latent_cache": (fused, 1), "rope_cache": (fused, 0)}
    assert_structural_equal(gm, _expected_kv_write(f32, functional=True))


# ---- lower_rope / lower_rms_norm --------------------------------------------------------------------

def _rope_graph(dtype, per_head=True):
    b = GraphBuilder(dtype=dtype)
    T = b.sym("num_tokens", 7)
    x = b.input("x", (T, N, R) if per_head else (T, R), dtype)
    positions = b.input("positions", (T,), i64)
    table = b.weight("cos_sin", rope_table(MAX_POS, R).to(dtype), parameter=False)
    return b.finish(b.op(aten.mul.Tensor, b.op(mla.rope.default, x, positions, table), 1.0))


@pytest.mark.parametrize("dtype, rule, emitted", [
    (f32, "q rope (aten: no InterleaveRope for this dtype)", {"npu.npu_interleave_rope.default": 0, "aten.cat.default": 1}),
    (bf16, "q rope", {"npu.npu_interleave_rope.default": 1, "aten.cat.default": 0}),
    (f16, "q rope", {"npu.npu_interleave_rope.default": 1, "aten.cat.default": 0})], ids=["fp32", "bf16", "fp16"])
def test_lower_rope(dtype, rule, emitted):
    gm = _rope_graph(dtype)
    positions = torch.tensor([3, 0, 17, 63, 5], dtype=i64)
    values = {"x": _randn(5, N, R, dtype=dtype, seed=3), "positions": positions,
              **rope_rows(rope_table(MAX_POS, R), positions, dtype)}
    check = check_pass(lower_rope, gm, make_inputs=inputs_for(values))
    assert _result(check.record) == (True, 1, {rule: 1})
    assert _count(gm, "mla.rope.default", *emitted) == {"mla.rope.default": 0, **emitted}
    assert graph_meta(gm).input_names[-2:] == ["rope_cos", "rope_sin"]
    if dtype == f32:    # Before/Expected, by hand: interleaved rope over the NPU layout's cos / sin rows
        e = GraphBuilder(dtype=dtype)
        T = e.sym("num_tokens", 7)
        x, _ = e.input("x", (T, N, R), dtype), e.input("positions", (T,), i64)
        cos, sin = e.input("rope_cos", (T, 1, 1, R), dtype), e.input("rope_sin", (T, 1, 1, R), dtype)
        e.weight("cos_sin", rope_table(MAX_POS, R).to(dtype), parameter=False)
        x0, x1 = e.op(aten.slice.Tensor, x, -1, 0, R, 2), e.op(aten.slice.Tensor, x, -1, 1, R, 2)
        c = e.op(aten.slice.Tensor, e.op(aten.view.default, cos, [-1, 1, R]), -1, 0, R // 2)
        s = e.op(aten.slice.Tensor, e.op(aten.view.default, sin, [-1, 1, R]), -1, 0, R // 2)
        first = e.op(aten.sub.Tensor, e.op(aten.mul.Tensor, x0, c), e.op(aten.mul.Tensor, x1, s))
        second = e.op(aten.add.Tensor, e.op(aten.mul.Tensor, x1, c), e.op(aten.mul.Tensor, x0, s))
        assert_structural_equal(gm, e.finish(e.op(aten.mul.Tensor, e.op(aten.cat.default, [first, second], -1), 1.0)))


def test_lower_rope_does_not_fire_on_a_rope_of_one_head():
    """Only per-head q rope ([T, N, R]); the key's [T, R] rope belongs to the cache-write fusion."""
    gm = _rope_graph(bf16, per_head=False)
    _unchanged(lower_rope, gm)
    assert "rope_cos" not in placeholders(gm)


@pytest.mark.parametrize("dtype", [f32, bf16], ids=["fp32", "bf16"])
def test_lower_rms_norm(dtype):
    b = GraphBuilder(dtype=dtype)
    x = b.input("x", (b.sym("num_tokens", 7), 16), dtype)
    gamma = b.weight("q_a_layernorm_weight", _randn(16, dtype=dtype, seed=2, std=0.2, mean=1.0))
    gm = b.finish(b.op(mla.rms_norm.default, x, gamma, 1e-5))
    check = check_pass(lower_rms_norm, gm, make_inputs=inputs_for({"x": _randn(5, 16, dtype=dtype, seed=1) * 3}))
    assert _result(check.record) == (True, 1, {"rms_norm": 1})
    assert ops(gm) == ["npu.npu_rms_norm.default", "getitem"]
    [norm] = nodes(gm, torch.ops.npu.npu_rms_norm.default)
    assert [a.name for a in norm.args[:2]] == ["x", "q_a_layernorm_weight"] and norm.args[2] == 1e-5
    assert nodes(gm, operator.getitem)[0].args == (norm, 0)
    e = GraphBuilder(dtype=dtype)     # Before/Expected: npu_rms_norm(x, gamma, eps)[0]
    x = e.input("x", (e.sym("num_tokens", 7), 16), dtype)
    gamma = e.weight("q_a_layernorm_weight", _randn(16, dtype=dtype, seed=2, std=0.2, mean=1.0))
    assert_structural_equal(gm, e.finish(e.op(operator.getitem, e.op(torch.ops.npu.npu_rms_norm.default, x, gamma,
                                                                      1e-5), 0)))


def test_lower_rms_norm_does_not_fire_without_rms_norm():
    _unchanged(lower_rms_norm, _rope_graph(f32))


# ---- lower_paged_attention (FIA MLA, BNSD) ---------------------------------------------------------

# FIA MLA mode's dims: latent 512, rope 64, block 16 (2 heads: the head count is advisory)
MLA_DIMS = dict(latent=512, rope=64, block=16)


def test_lower_paged_attention():
    gm = paged_graph("decode", dtype=bf16, **MLA_DIMS)
    inputs = placeholders(gm)
    values = paged_values([(1, 20), (1, 5)], dtype=bf16, num_blocks=5, nan_outside=False, **MLA_DIMS)
    values["seq_lens_list"] = values["seq_lens"].tolist()
    check = check_pass(lower_paged_attention, gm, make_inputs=inputs_for(values))
    assert _result(check.record) == (True, 1, {"paged latent attention (BNSD)": 1})
    assert placeholders(gm) == inputs + ["seq_lens_list"] and graph_meta(gm).input_names[-1] == "seq_lens_list"
    assert ops(gm) == ["aten.view.default"] * 4 + [FIA, "getitem", "aten.view.default"]
    [fia] = nodes(gm, torch.ops.npu.npu_fused_infer_attention_score.default)
    q, k, v = fia.args
    assert k is v and q.args == (gm.graph.find_nodes(op="placeholder", target="ql")[0], [-1, N, 1, 512])
    assert k.args[1] == [-1, 1, 16, 512] and k.args[0].name == "latent_cache"
    assert {key: getattr(val, "name", val) for key, val in fia.kwargs.items()} == {
        "query_rope": fia.kwargs["query_rope"].name, "key_rope": fia.kwargs["key_rope"].name,
        "actual_seq_lengths_kv": "seq_lens_list", "block_table": "block_table", "num_heads": N, "scale": SCALE,
        "input_layout": "BNSD", "num_key_value_heads": 1, "sparse_mode": 0, "block_size": 16}
    assert fia.kwargs["key_rope"].args == (gm.graph.find_nodes(op="placeholder", target="rope_cache")[0],
                                           [-1, 1, 16, 64])
    # Before/Expected: the caches as [blocks, 1, 16, D] (BNSD with one KV head), q as [B, N, 1, D]
    e = GraphBuilder(phase="decode", dtype=bf16, block_size=16, num_heads=N)
    T, B, NB, MB = _sizes(e, "decode")
    ql, q_pe = e.input("ql", (T, N, 512), bf16), e.input("q_pe", (T, N, 64), bf16)
    latent_cache, rope_cache, bt, _, _ = _cache_inputs(e, NB, B, MB, latent=512, rope=64, block=16, dtype=bf16)
    kv_lens = e.input("seq_lens_list", value=[])
    k, kr = e.op(aten.view.default, latent_cache, [-1, 1, 16, 512]), e.op(aten.view.default, rope_cache, [-1, 1, 16, 64])
    q, qr = e.op(aten.view.default, ql, [-1, N, 1, 512]), e.op(aten.view.default, q_pe, [-1, N, 1, 64])
    fia = e.op(torch.ops.npu.npu_fused_infer_attention_score.default, q, k, k, query_rope=qr, key_rope=kr,
               actual_seq_lengths_kv=kv_lens, block_table=bt, num_heads=N, scale=SCALE, input_layout="BNSD",
               num_key_value_heads=1, sparse_mode=0, block_size=16)
    assert_structural_equal(gm, e.finish(e.op(aten.view.default, e.op(operator.getitem, fia, 0), [-1, N, 512])))


def test_lower_paged_attention_multi_decode_is_fia_tnd():
    """A multi_decode graph (1..16 new tokens per request): FIA's MLA mode in the TND layout, causal
    (sparse_mode 3, the compressed 2048 mask) with cumulative query ends, as vllm-ascend runs MTP."""
    gm = paged_graph("multi_decode", dtype=bf16, **MLA_DIMS)
    inputs = placeholders(gm)
    values = paged_values([(3, 20), (1, 5), (16, 17)], dtype=bf16, num_blocks=8, nan_outside=False, **MLA_DIMS)
    values["seq_lens_list"] = values["seq_lens"].tolist()
    values["query_ends_list"] = values["query_start_loc"][1:].tolist()
    check = check_pass(lower_paged_attention, gm, make_inputs=inputs_for(values))
    assert _result(check.record) == (True, 1, {"paged latent attention of several tokens per request (TND)": 1})
    assert placeholders(gm) == inputs + ["query_ends_list", "seq_lens_list"]
    # Before/Expected
    e = GraphBuilder(phase="multi_decode", dtype=bf16, block_size=16, num_heads=N)
    T, B, NB, MB = _sizes(e, "multi_decode")
    ql, q_pe = e.input("ql", (T, N, 512), bf16), e.input("q_pe", (T, N, 64), bf16)
    latent_cache, rope_cache, bt, _, _ = _cache_inputs(e, NB, B, MB, latent=512, rope=64, block=16, dtype=bf16)
    q_ends, kv_lens = e.input("query_ends_list", value=[]), e.input("seq_lens_list", value=[])
    mask = e.weight("fia_causal_mask", torch.ones(2048, 2048, dtype=torch.bool).triu(1), parameter=False)
    k, kr = e.op(aten.view.default, latent_cache, [-1, 1, 16, 512]), e.op(aten.view.default, rope_cache, [-1, 1, 16, 64])
    fia = e.op(torch.ops.npu.npu_fused_infer_attention_score.default, ql, k, k, query_rope=q_pe, key_rope=kr,
               atten_mask=mask, actual_seq_lengths=q_ends, actual_seq_lengths_kv=kv_lens, block_table=bt, num_heads=N,
               scale=SCALE, input_layout="TND", num_key_value_heads=1, sparse_mode=3, block_size=16)
    assert_structural_equal(gm, e.finish(e.op(operator.getitem, fia, 0)))


def test_lower_paged_attention_multi_decode_outside_fia_limits_is_left_alone():
    gm = paged_graph("multi_decode", dtype=f32, **MLA_DIMS)
    bnsd, tnd = _unchanged(lower_paged_attention, gm).notes
    assert "not FIA" in tnd and "query.dtype=torch.float32" in tnd


@pytest.mark.parametrize("phase, dtype, dims, why", [
    ("decode", f32, MLA_DIMS, "query.dtype=torch.float32"),
    ("decode", bf16, dict(MLA_DIMS, block=32), "block_size=32"),
    ("decode", bf16, dict(MLA_DIMS, latent=256), "query D=256"),
    ("prefill", bf16, MLA_DIMS, "query tokens per request"),     # T is not one token per request
], ids=["fp32", "block32", "latent256", "prefill"])
def test_lower_paged_attention_does_not_fire_outside_fia_mla_limits(phase, dtype, dims, why):
    gm = paged_graph(phase, dtype=dtype, **dims)
    [note] = _unchanged(lower_paged_attention, gm).notes
    assert "not FIA" in note and why in note
    assert "seq_lens_list" not in placeholders(gm) and "seq_lens_list" not in graph_meta(gm).input_names


# ---- lower_context_attention (FIA TND) ---------------------------------------------------------------

PREFILL_TND = [(3, 3), (2, 5)]      # a first chunk (no prefix) and a chunk after 3 cached tokens


def _context_slots(values, block):
    slots = []
    for row, s in zip(values["block_table"].tolist(), values["seq_lens"].tolist()):
        slots += [row[p // block] * block + p % block for p in range(s)]
    return torch.tensor(slots, dtype=i64)


def test_lower_context_attention():
    dims = dict(TND, latent=16)
    gm = decompressed_graph("prefill", dtype=bf16, kv_b=_kv_b(bf16, heads=8, nope=128, v_dim=128, latent=16, std=0.1),
                            **dims)
    inputs = placeholders(gm)
    values = decompressed_values(PREFILL_TND, dtype=bf16, heads=8, nope=128, rope=64, latent=16, block=16,
                                 num_blocks=4)
    values.update(context_slots=_context_slots(values, 16), query_ends_list=[3, 5], context_ends_list=[3, 8])
    check = check_pass(lower_context_attention, gm, make_inputs=inputs_for(values))
    assert _result(check.record) == (True, 1, {"decompressed context attention (TND)": 1})
    assert placeholders(gm) == inputs + ["context_slots", "query_ends_list", "context_ends_list"]
    assert _count(gm, "mla.attention.default", "mla.gather_paged.default", FIA, "aten.index_select.default",
                  "aten.linear.default") == {"mla.attention.default": 0, "mla.gather_paged.default": 0, FIA: 1,
                                             "aten.index_select.default": 2, "aten.linear.default": 1}
    [fia] = nodes(gm, torch.ops.npu.npu_fused_infer_attention_score.default)
    assert fia.kwargs["atten_mask"].op == "get_attr" and fia.kwargs["atten_mask"].target == "fia_causal_mask"
    mask = gm.fia_causal_mask
    assert mask.shape == (2048, 2048) and torch.equal(mask, torch.ones(2048, 2048, dtype=torch.bool).triu(1))
    assert {k: getattr(v, "name", v) for k, v in fia.kwargs.items() if k != "atten_mask"} == {
        "actual_seq_lengths": "query_ends_list", "actual_seq_lengths_kv": "context_ends_list", "num_heads": 8,
        "scale": SCALE, "input_layout": "TND", "num_key_value_heads": 8, "sparse_mode": 3}
    # Before/Expected: each request's context rows picked from the flat caches (ragged, [C, D]), K/V
    # decompressed from them, FIA TND with the causal mask and host lists of ends
    e = GraphBuilder(phase="prefill", dtype=bf16, block_size=16, num_heads=8)
    T, B, NB, MB = _sizes(e, "prefill")
    q_nope, q_pe = e.input("q_nope", (T, 8, 128), bf16), e.input("q_pe", (T, 8, 64), bf16)
    latent_cache, rope_cache, *_ = _cache_inputs(e, NB, B, MB, latent=16, rope=64, block=16, dtype=bf16)
    slots = e.input("context_slots", (e.sym("C", 29),), i64)
    q_ends, kv_ends = e.input("query_ends_list", value=[]), e.input("context_ends_list", value=[])
    w = e.weight("kv_b_proj_weight", _kv_b(bf16, heads=8, nope=128, v_dim=128, latent=16, std=0.1))
    mask = e.weight("fia_causal_mask", mask, parameter=False)
    latent = e.op(aten.index_select.default, e.op(aten.view.default, latent_cache, [-1, 16]), 0, slots)
    rope = e.op(aten.index_select.default, e.op(aten.view.default, rope_cache, [-1, 64]), 0, slots)
    kv = e.op(aten.split_with_sizes.default, e.op(aten.view.default, e.op(aten.linear.default, latent, w), [-1, 8, 256]),
              [128, 128], -1)
    k_nope, v = e.op(operator.getitem, kv, 0), e.op(operator.getitem, kv, 1)
    k = e.op(aten.cat.default, [k_nope, e.op(aten.expand.default, e.op(aten.view.default, rope, [-1, 1, 64]),
                                             [-1, 8, 64])], -1)
    out = e.op(torch.ops.npu.npu_fused_infer_attention_score.default, e.op(aten.cat.default, [q_nope, q_pe], -1), k, v,
               atten_mask=mask, actual_seq_lengths=q_ends, actual_seq_lengths_kv=kv_ends, num_heads=8, scale=SCALE,
               input_layout="TND", num_key_value_heads=8, sparse_mode=3)
    assert_structural_equal(gm, e.finish(e.op(operator.getitem, out, 0)))


def test_lower_context_attention_does_not_fire_on_latent_attention():
    gm = latent_graph("prefill", dtype=bf16)
    _unchanged(lower_context_attention, gm)
    assert "context_slots" not in placeholders(gm)


def test_lower_context_attention_refuses_what_fia_tnd_cannot_take():
    gm = decompressed_graph("prefill", kv_b=_kv_b())        # fp32, 2 heads, q/k 8
    with pytest.raises(ValueError, match="FIA TND kernel cannot take.*query.dtype=torch.float32"):
        lower_context_attention(gm)


# ---- fuse_mla_prolog ----------------------------------------------------------------------------------

PROLOG = "npu.npu_mla_prolog_v3_functional.default"
# npu_mla_prolog_v3's dims (He 6144, Hcq 1536, Hckv 512, D 128, Dr 64), one head; and tiny ones
PROLOG_DIMS = dict(hidden=6144, q_lora=1536, heads=1, nope=128, rope=64, latent=512, block=16)
TINY_PROLOG = dict(hidden=64, q_lora=32, heads=N, nope=P, rope=R, latent=L, block=BS)


def prolog_graph(dtype, *, hidden, q_lora, heads, nope, rope, latent, block, q_rope=True):
    """The absorbed decode prolog feeding the paged attention, as absorb + page leave it:

        q = linear(rms_norm(linear(h, w_qa)), w_qb) -> view -> split -> bmm(q_nope^T, w_uk)^T, mla.rope(q_pe)
        mla.cache_write(rms_norm(c), mla.rope(k), latent, rope, slots) with c, k = split(linear(h, w_kva))
        o = mla.paged_attention(ql, q_pe, latent_cache, rope_cache, bt, qsl, seq_lens, s)
    """
    b = GraphBuilder(phase="decode", dtype=dtype, block_size=block, num_heads=heads)
    T, B, NB, MB = _sizes(b, "decode")
    h = b.input("hidden_states", (T, hidden), dtype)
    positions = b.input("positions", (T,), i64)
    slots = b.input("slot_mapping", (T,), i64)
    latent_cache, rope_cache, bt, seq_lens, qsl = _cache_inputs(b, NB, B, MB, latent=latent, rope=rope, block=block,
                                                                dtype=dtype)
    w = {name: b.weight(name, _randn(*shape, dtype=dtype, seed=i, std=std, mean=mean)) for i, (name, shape, std, mean)
         in enumerate([("q_a_proj_weight", (q_lora, hidden), 0.02, 0.0), ("q_a_layernorm_weight", (q_lora,), 0.2, 1.0),
                       ("q_b_proj_weight", (heads * (nope + rope), q_lora), 0.05, 0.0),
                       ("kv_a_proj_weight", (latent + rope, hidden), 0.02, 0.0),
                       ("kv_a_layernorm_weight", (latent,), 0.2, 1.0)])}
    # scores of moderate size (|logit| ~ 2): with one-hot softmaxes bf16 rounding would decide the output
    w_uk = b.weight("attention_w_uk", _randn(heads, nope, latent, dtype=dtype, seed=9, std=0.01), parameter=False)
    table = b.weight("cos_sin", rope_table(MAX_POS, rope).to(dtype), parameter=False)
    q_a = b.op(mla.rms_norm.default, b.op(aten.linear.default, h, w["q_a_proj_weight"]), w["q_a_layernorm_weight"], EPS)
    q = b.op(aten.view.default, b.op(aten.linear.default, q_a, w["q_b_proj_weight"]),
             [b.op(aten.sym_size.int, h, 0), heads, nope + rope])
    q_parts = b.op(aten.split_with_sizes.default, q, [nope, rope], -1)
    q_nope = b.op(operator.getitem, q_parts, 0)
    ql = b.op(aten.permute.default, b.op(aten.bmm.default, b.op(aten.permute.default, q_nope, [1, 0, 2]), w_uk),
              [1, 0, 2])
    q_pe = b.op(operator.getitem, q_parts, 1)
    if q_rope:
        q_pe = b.op(mla.rope.default, q_pe, positions, table)
    kv_parts = b.op(aten.split_with_sizes.default, b.op(aten.linear.default, h, w["kv_a_proj_weight"]), [latent, rope], -1)
    normed = b.op(mla.rms_norm.default, b.op(operator.getitem, kv_parts, 0), w["kv_a_layernorm_weight"], EPS)
    roped = b.op(mla.rope.default, b.op(operator.getitem, kv_parts, 1), positions, table)
    b.op(mla.cache_write.default, normed, roped, latent_cache, rope_cache, slots)
    return b.finish(b.op(mla.paged_attention.default, ql, q_pe, latent_cache, rope_cache, bt, qsl, seq_lens, SCALE))


def test_fuse_mla_prolog():
    gm = prolog_graph(bf16, **PROLOG_DIMS)
    weights = {name: getattr(gm, name).clone() for name in ("q_a_proj_weight", "q_b_proj_weight", "kv_a_proj_weight")}
    values = paged_values([(1, 20), (1, 5)], dtype=bf16, latent=512, rope=64, block=16, heads=1, num_blocks=5,
                          nan_outside=False)
    values["hidden_states"] = _randn(2, 6144, dtype=bf16, seed=5)
    values.update(rope_rows(rope_table(MAX_POS, 64), values["positions"], bf16))
    check = check_pass(fuse_mla_prolog, gm, make_inputs=inputs_for(values), compare_mutated=True)
    assert check.mutated == ["latent_cache", "rope_cache"]
    assert _result(check.record) == (True, 1, {"mla prolog": 1})
    assert ops(gm) == ["aten.view.default", "aten.view.default", PROLOG] + ["getitem"] * 4 + \
        ["mla.paged_attention.default", "aten.copy_.default", "aten.copy_.default"]
    [prolog] = nodes(gm, torch.ops.npu.npu_mla_prolog_v3_functional.default)
    assert prolog.args[0].name == "hidden_states" and prolog.args[3].target == "attention_w_uk"
    assert [a.target for a in prolog.args[5:7]] == ["q_a_layernorm_weight", "kv_a_layernorm_weight"]
    assert [a.name for a in prolog.args[9:11]] == ["latent_cache", "rope_cache"]
    assert prolog.kwargs["cache_index"].name == "slot_mapping" and prolog.kwargs["cache_mode"] == "PA_BSND"
    # the weights go in as new [in, out] tensors; the model's own are untouched
    for index, name in ((1, "q_a_proj_weight"), (2, "q_b_proj_weight"), (4, "kv_a_proj_weight")):
        assert torch.equal(getattr(gm, prolog.args[index].target), weights[name].t())
        assert torch.equal(getattr(gm, name), weights[name])
    [attention] = nodes(gm, mla.paged_attention.default)
    assert [(a.target, a.args) for a in attention.args[:4]] == [
        (operator.getitem, (prolog, 0)), (operator.getitem, (prolog, 1)), (operator.getitem, (prolog, 5)),
        (operator.getitem, (prolog, 6))]
    FileCheck().check("torch.ops.mla.paged_attention.default(").check("copy_.default(latent_cache") \
        .check("copy_.default(rope_cache").run(gm.code)
    # Before/Expected: the one prolog kernel (sin before cos, as its schema orders them), the attention
    # reading its query, query rope and updated caches, the caches copied back last
    e = GraphBuilder(phase="decode", dtype=bf16, block_size=16, num_heads=1)
    T, B, NB, MB = _sizes(e, "decode")
    h, _, slots = e.input("hidden_states", (T, 6144), bf16), e.input("positions", (T,), i64), \
        e.input("slot_mapping", (T,), i64)
    latent_cache, rope_cache, bt, seq_lens, qsl = _cache_inputs(e, NB, B, MB, latent=512, rope=64, block=16, dtype=bf16)
    cos, sin = e.input("rope_cos", (T, 1, 1, 64), bf16), e.input("rope_sin", (T, 1, 1, 64), bf16)
    g_cq, g_ckv, w_uk = (e.weight(n, getattr(gm, n), parameter=False) for n in
                         ("q_a_layernorm_weight", "kv_a_layernorm_weight", "attention_w_uk"))
    w_dq, w_uq_qr, w_dkv_kr = (e.weight(f"paged_attention_default_prolog_{n}", getattr(gm, prolog.args[i].target),
                                        parameter=False) for i, n in ((1, "w_dq"), (2, "w_uq_qr"), (4, "w_dkv_kr")))
    cos2, sin2 = e.op(aten.view.default, cos, [-1, 64]), e.op(aten.view.default, sin, [-1, 64])
    fused = e.op(torch.ops.npu.npu_mla_prolog_v3_functional.default, h, w_dq, w_uq_qr, w_uk, w_dkv_kr, g_cq, g_ckv,
                 sin2, cos2, latent_cache, rope_cache, cache_index=slots, rmsnorm_epsilon_cq=EPS,
                 rmsnorm_epsilon_ckv=EPS, cache_mode="PA_BSND")
    query, query_rope, new_latent, new_rope = (e.op(operator.getitem, fused, i) for i in (0, 1, 5, 6))
    out = e.op(mla.paged_attention.default, query, query_rope, new_latent, new_rope, bt, qsl, seq_lens, SCALE)
    e.op(aten.copy_.default, latent_cache, new_latent)
    e.op(aten.copy_.default, rope_cache, new_rope)
    assert_structural_equal(gm, e.finish(out))


@pytest.mark.parametrize("dtype, dims, why", [
    (f32, PROLOG_DIMS, "token_x.dtype=torch.float32"),
    (bf16, TINY_PROLOG, "He (hidden size)=64"),
], ids=["fp32", "tiny-bf16"])
def test_fuse_mla_prolog_does_not_fire_outside_its_limits(dtype, dims, why):
    gm = prolog_graph(dtype, **dims)
    [note] = _unchanged(fuse_mla_prolog, gm).notes
    assert "not fused" in note and why in note


def test_fuse_mla_prolog_does_not_fire_without_the_q_rope():
    gm = prolog_graph(bf16, **TINY_PROLOG, q_rope=False)
    [note] = _unchanged(fuse_mla_prolog, gm).notes
    assert "no full q_lora prolog" in note


# ---- lengths_as_tensors -----------------------------------------------------------------------------

AIR_FIA = "air.npu_fused_infer_attention_score.default"


def _fia_graph(lengths_name="seq_lens_list"):
    """o = npu.npu_fused_infer_attention_score(q, k, k, ..., actual_seq_lengths_kv=<host list>)[0]
    (FIA MLA BNSD over the paged cache, as lower_paged_attention emits it)."""
    b = GraphBuilder(phase="decode", dtype=bf16, block_size=16)
    B = b.sym("num_reqs", 3)
    NB, MB = b.sym("num_blocks", 13), b.sym("max_blocks", 5)
    q, q_pe = b.input("q", (B, N, 1, 512), bf16), b.input("q_pe", (B, N, 1, 64), bf16)
    k, k_pe = b.input("latent_cache", (NB, 1, 16, 512), bf16), b.input("rope_cache", (NB, 1, 16, 64), bf16)
    bt = b.input("block_table", (B, MB), i32)
    b.input("seq_lens", (B,), i32)             # lengths_as_tensors sizes its int64 tensor by it
    lengths = b.input(lengths_name, value=[])
    fia = b.op(torch.ops.npu.npu_fused_infer_attention_score.default, q, k, k, query_rope=q_pe, key_rope=k_pe,
               actual_seq_lengths_kv=lengths, block_table=bt, num_heads=N, scale=SCALE, input_layout="BNSD",
               num_key_value_heads=1, sparse_mode=0, block_size=16)
    return b.finish(b.op(operator.getitem, fia, 0))


def test_lengths_as_tensors():
    gm = _fia_graph()
    [before] = nodes(gm, torch.ops.npu.npu_fused_infer_attention_score.default)
    kwargs = dict(before.kwargs)
    batch = paged_values([(1, 20), (1, 5)], dtype=bf16, latent=512, rope=64, block=16, num_blocks=5, nan_outside=False)
    values = {"q": batch["ql"][:, :, None], "q_pe": batch["q_pe"][:, :, None],
              "latent_cache": batch["latent_cache"].view(5, 1, 16, 512), "rope_cache": batch["rope_cache"].view(5, 1, 16, 64),
              "block_table": batch["block_table"], "seq_lens": batch["seq_lens"],
              "seq_lens_list": batch["seq_lens"].tolist(), "seq_lens_int64": batch["seq_lens"].to(i64)}
    check = check_pass(lengths_as_tensors, gm, make_inputs=inputs_for(values))
    assert _result(check.record) == (True, 1, {"FIA lengths as tensors": 1})
    assert ops(gm) == [AIR_FIA, "getitem"]
    # the host list is gone, the int64 device tensor (GE's only length dtype) took its place
    assert placeholders(gm) == ["q", "q_pe", "latent_cache", "rope_cache", "block_table", "seq_lens", "seq_lens_int64"]
    assert graph_meta(gm).input_names == placeholders(gm)
    [air] = nodes(gm, torch.ops.air.npu_fused_infer_attention_score.default)
    lengths = air.kwargs["actual_seq_lengths_kv"]
    assert lengths.name == "seq_lens_int64" and lengths.meta["val"].dtype == i64
    assert str(lengths.meta["val"].shape[0]) == str(gm.graph.find_nodes(op="placeholder", target="seq_lens")[0]
                                                   .meta["val"].shape[0])
    assert {k: v for k, v in air.kwargs.items() if k != "actual_seq_lengths_kv"} == \
        {k: v for k, v in kwargs.items() if k != "actual_seq_lengths_kv"}
    # Before/Expected: the same call, by torchair's air FIA, lengths from the int64 tensor
    e = GraphBuilder(phase="decode", dtype=bf16, block_size=16)
    B = e.sym("num_reqs", 3)
    NB, MB = e.sym("num_blocks", 13), e.sym("max_blocks", 5)
    q, q_pe = e.input("q", (B, N, 1, 512), bf16), e.input("q_pe", (B, N, 1, 64), bf16)
    k, k_pe = e.input("latent_cache", (NB, 1, 16, 512), bf16), e.input("rope_cache", (NB, 1, 16, 64), bf16)
    bt, _ = e.input("block_table", (B, MB), i32), e.input("seq_lens", (B,), i32)
    lengths = e.input("seq_lens_int64", (B,), i64)
    fia = e.op(torch.ops.air.npu_fused_infer_attention_score.default, q, k, k, query_rope=q_pe, key_rope=k_pe,
               actual_seq_lengths_kv=lengths, block_table=bt, num_heads=N, scale=SCALE, input_layout="BNSD",
               num_key_value_heads=1, sparse_mode=0, block_size=16)
    assert_structural_equal(gm, e.finish(e.op(operator.getitem, fia, 0)))


def test_lengths_as_tensors_does_not_fire_on_a_list_with_no_tensor_form():
    gm = _fia_graph("decode_seq_lens_list")
    assert "no tensor form" in _unchanged(lengths_as_tensors, gm).notes[0]


def test_lengths_as_tensors_does_not_fire_without_fia():
    _unchanged(lengths_as_tensors, paged_graph())


# ---- decompose_linear ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [f32, bf16], ids=["fp32", "bf16"])
def test_decompose_linear(dtype):
    b = GraphBuilder(dtype=dtype)
    x = b.input("x", (b.sym("num_tokens", 7), 16), dtype)
    w = b.weight("o_proj_weight", _randn(12, 16, dtype=dtype, seed=3, std=0.3))
    gm = b.finish(b.op(aten.linear.default, b.op(aten.relu.default, x), w))
    check = check_pass(decompose_linear, gm, make_inputs=inputs_for({"x": _randn(5, 16, dtype=dtype, seed=4)}))
    assert _result(check.record) == (True, 1, {"linear -> mm": 1})
    assert ops(gm) == ["aten.relu.default", "aten.t.default", "aten.mm.default"]
    [mm] = nodes(gm, aten.mm.default)
    assert mm.args[0].target is aten.relu.default and mm.args[1].args[0].target == "o_proj_weight"
    e = GraphBuilder(dtype=dtype)     # Before/Expected: y = mm(relu(x), t(w))
    x = e.input("x", (e.sym("num_tokens", 7), 16), dtype)
    w = e.weight("o_proj_weight", _randn(12, 16, dtype=dtype, seed=3, std=0.3))
    assert_structural_equal(gm, e.finish(e.op(aten.mm.default, e.op(aten.relu.default, x), e.op(aten.t.default, w))))


@pytest.mark.parametrize("case", ["3d-input", "bias"])
def test_decompose_linear_does_not_fire(case):
    b = GraphBuilder()
    x = b.input("x", (2, b.sym("num_tokens", 7), 16) if case == "3d-input" else (b.sym("num_tokens", 7), 16))
    w = b.weight("w", _randn(12, 16))
    args = (b.weight("bias", _randn(12)),) if case == "bias" else ()
    _unchanged(decompose_linear, b.finish(b.op(aten.linear.default, x, w, *args)))


# ---- insert_multistream_scopes ----------------------------------------------------------------------

def _two_branch_graph(*, one_chain=False, key_first=False):
    """FIA (plain BNSD, fp16) whose query and key come from two matmuls of the same input:

        q = neg(view(mm(h, t(wq)), [-1, 2, 1, 8]))      # 4 ops
        k = view(mm(h, t(wk)), [-1, 2, 3, 8])           # 3 ops: the smaller branch
        o = npu.npu_fused_infer_attention_score(q, k, k, num_heads=2, input_layout='BNSD')[0]
    Sizes are -1, not sym_size(h): a shared size node would join the branches. With one_chain, q is
    cut from k's matmul: a single producer chain. key_first: the key branch comes first in the graph.
    """
    b = GraphBuilder(dtype=f16)
    h = b.input("h", (b.sym("num_reqs", 3), 16), f16)
    wk = b.weight("wk", _randn(48, 16, dtype=f16, seed=1, std=0.3))
    wq = None if one_chain else b.weight("wq", _randn(16, 16, dtype=f16, seed=2, std=0.3))

    def key():
        kx = b.op(aten.mm.default, h, b.op(aten.t.default, wk))
        return kx, b.op(aten.view.default, kx, [-1, 2, 3, 8])

    def query():
        return b.op(aten.neg.default, b.op(aten.view.default, b.op(aten.mm.default, h, b.op(aten.t.default, wq)),
                                           [-1, 2, 1, 8]))

    if one_chain:
        kx, k = key()
        q = b.op(aten.view.default, b.op(aten.slice.Tensor, kx, 1, 0, 16), [-1, 2, 1, 8])
    elif key_first:
        (_, k), q = key(), query()
    else:
        q, (_, k) = query(), key()
    fia = b.op(torch.ops.npu.npu_fused_infer_attention_score.default, q, k, k, num_heads=2, scale=SCALE,
               input_layout="BNSD")
    return b.finish(b.op(operator.getitem, fia, 0))


def _check_multistream(gm):
    check = check_pass(insert_multistream_scopes, gm, make_inputs=inputs_for({"h": _randn(3, 16, dtype=f16, seed=6)}))
    assert _result(check.record) == (True, 1, {"secondary-stream branch": 1})
    # the key branch (t, mm, view of wk) moves to the front, inside the scope; the query waits on it
    assert ops(gm) == ["air.scope_enter.default", "aten.t.default", "aten.mm.default", "aten.view.default",
                       "air.scope_exit.default", "aten.t.default", "aten.mm.default",
                       "aten.view.default", "aten.neg.default", "air.wait_tensor.default", FIA, "getitem"]
    [enter] = nodes(gm, torch.ops.air.scope_enter.default)
    assert enter.args == (["_user_stream_label", "_user_stream_priority"], ["mla_secondary", "0"])
    [wait] = nodes(gm, torch.ops.air.wait_tensor.default)
    [fia] = nodes(gm, torch.ops.npu.npu_fused_infer_attention_score.default)
    assert fia.args[0] is wait and wait.args[0].target is aten.neg.default
    assert wait.args[1] is fia.args[1]                 # the key: the branch's result the attention reads
    assert wait.args[1].args[0].args[1].args[0].target == "wk"
    # Before/Expected: the key branch inside the secondary-stream scope, first; the query after it,
    # waiting on the key before the attention reads both
    e = GraphBuilder(dtype=f16)
    h = e.input("h", (e.sym("num_reqs", 3), 16), f16)
    wk = e.weight("wk", _randn(48, 16, dtype=f16, seed=1, std=0.3))
    wq = e.weight("wq", _randn(16, 16, dtype=f16, seed=2, std=0.3))
    e.op(torch.ops.air.scope_enter.default, ["_user_stream_label", "_user_stream_priority"], ["mla_secondary", "0"])
    k = e.op(aten.view.default, e.op(aten.mm.default, h, e.op(aten.t.default, wk)), [-1, 2, 3, 8])
    e.op(torch.ops.air.scope_exit.default)
    q = e.op(aten.neg.default, e.op(aten.view.default, e.op(aten.mm.default, h, e.op(aten.t.default, wq)), [-1, 2, 1, 8]))
    fia = e.op(torch.ops.npu.npu_fused_infer_attention_score.default, e.op(torch.ops.air.wait_tensor.default, q, k), k,
               k, num_heads=2, scale=SCALE, input_layout="BNSD")
    assert_structural_equal(gm, e.finish(e.op(operator.getitem, fia, 0)))


def test_insert_multistream_scopes():
    _check_multistream(_two_branch_graph())


def test_insert_multistream_scopes_when_the_moved_branch_comes_first():
    _check_multistream(_two_branch_graph(key_first=True))


def test_insert_multistream_scopes_does_not_fire_on_one_producer_chain():
    gm = _two_branch_graph(one_chain=True)
    assert "one producer chain" in _unchanged(insert_multistream_scopes, gm).notes[0]


# ---- check_fully_lowered --------------------------------------------------------------------------

def test_check_fully_lowered_passes_a_lowered_graph_unchanged():
    gm = _two_branch_graph()
    record = _unchanged(check_fully_lowered, gm)
    assert record.notes == []


def test_check_fully_lowered_rejects_an_mla_op_left():
    gm = paged_graph()
    with pytest.raises(PassVerificationError, match="no mla:: op.*mla.paged_attention.default is still in the graph"):
        PassManager([check_fully_lowered]).run(gm)


# ---- every pass of every pipeline has a test here ---------------------------------------------------

def test_every_pipeline_pass_is_tested_here():
    import sys
    source = open(sys.modules[__name__].__file__).read()
    in_pipelines = {fn.__name__ for target in TARGETS.values() for phase in ("prefill", "decode", "mixed")
                    for fn in target.pipeline(phase)}
    untested = sorted(name for name in in_pipelines if f"def test_{name}" not in source)
    assert untested == []
    assert len(in_pipelines) >= 20             # the scan saw the pipelines

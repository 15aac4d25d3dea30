"""Direct tests of the torchair decode passes (passes/torchair_lower.py, passes/multistream.py).

Each pass runs on a captured decode graph that the torchair pipeline's earlier passes have
prepared, in pipeline order, through the public harness mla_graph.testing.check_pass: structure
(FileCheck op counts on gm.code), its match count, numerics of the output and both paged caches
against the graph before the pass, and a case where it must not fire.
"""
import dataclasses
import functools
import operator

import pytest
import torch
from conftest import TOL, V2_LITE_NPU, V2_LITE_TINY, V3_NPU, V3_TINY, randomize
from torch.testing import FileCheck

from mla_graph.contract import graph_meta
from mla_graph import MLAAttention, MLAConfig, capture
from mla_graph.inputs import Call
from mla_graph.runtime.binding import graph_inputs
from mla_graph.checking import random_batch
from mla_graph.npu import ensure_npu_ops
from mla_graph.npu.formats import npu_format
from mla_graph.npu.limits import ACL_FORMAT_FRACTAL_NZ
from mla_graph.targets import pipeline as target_pipeline
from mla_graph.npu.air_ops import ensure_air_ops
from mla_graph.passes import PassManager
from mla_graph.passes.multistream import insert_multistream_scopes
from mla_graph.passes.npu_lower import lower_paged_attention
from mla_graph.testing import PassCheck, check_pass, snapshot
from mla_graph.passes.torchair_lower import (decompose_linear, fuse_kv_rmsnorm_rope_cache_functional, fuse_mla_prolog,
                                   lengths_as_tensors)

aten, mla = torch.ops.aten, torch.ops.mla
BLOCK = 16
DECODE = [(1, 37), (1, 5), (1, 130)]
MIXED = [(1, 19), (1, 3), (7, 0), (5, 12)]

PROLOG = "npu.npu_mla_prolog_v3_functional.default"
KV_FUNCTIONAL = "npu.npu_kv_rmsnorm_rope_cache.default"
NPU_FIA = "npu.npu_fused_infer_attention_score.default"
AIR_FIA = "air.npu_fused_infer_attention_score.default"


@pytest.fixture(scope="module", autouse=True)
def _ops():
    ensure_npu_ops()
    ensure_air_ops()


@functools.lru_cache(maxsize=None)
def _layer(config: MLAConfig, dtype: torch.dtype) -> MLAAttention:
    # the kernel-sized configs get weights at a realistic scale (std 0.2 over 6144 inputs makes
    # logits so large that bf16 rounding decides the softmax)
    return randomize(MLAAttention(config, dtype=dtype), seed=4, std=0.02 if config in (V3_NPU, V2_LITE_NPU) else 0.2)


@functools.lru_cache(maxsize=None)
def _captured(config: MLAConfig, dtype: torch.dtype, phase: str):
    return capture(_layer(config, dtype), phase, block_size=BLOCK)


def _prepared(config: MLAConfig, dtype: torch.dtype, upto=None, *, phase: str = "decode", pipeline=None):
    """A fresh copy of the captured graph with the pipeline's passes before `upto` run, in order
    (all of them when `upto` is None). Default pipeline: the torchair decode passes."""
    gm = snapshot(_captured(config, dtype, phase))
    passes = list(pipeline if pipeline is not None else target_pipeline("torchair", "decode"))
    PassManager(passes if upto is None else passes[: passes.index(upto)]).run(gm)
    return gm


def _batch_inputs(layer: MLAAttention, requests, seed: int):
    """make_inputs for check_pass: one fixed random batch, fresh (cache cloned) for each call."""
    def make(gm):
        batch = random_batch(layer, requests, block_size=BLOCK, seed=seed)
        return graph_inputs(gm, Call(batch.hidden_states, batch.positions, batch.cache.clone(), batch.metadata,
                                     layer.cos_sin))
    return make


def _check(pass_fn, gm, config: MLAConfig, dtype: torch.dtype, *, seed: int, **expect) -> PassCheck:
    """check_pass on a decode batch: the output and both caches at the dtype's whole-layer tolerance."""
    check = check_pass(pass_fn, gm, make_inputs=_batch_inputs(_layer(config, dtype), DECODE, seed),
                       compare_mutated=True, tolerances=TOL, **expect)
    # the batch's new tokens were written, so both caches were compared (not skipped as unchanged)
    assert check.mutated == ["latent_cache", "rope_cache"]
    return check


def _no_fire(pass_fn, gm) -> PassCheck:
    """No change and no match reported; check_pass holds the pass to an unchanged gm.code too."""
    return check_pass(pass_fn, gm, compare_numerics=False, expect_changed=False, expect_matches=0)


# ---- fuse_mla_prolog ------------------------------------------------------------------------

def test_fuse_mla_prolog_v3_bf16():
    gm = _prepared(V3_NPU, torch.bfloat16, fuse_mla_prolog)
    check = _check(fuse_mla_prolog, gm, V3_NPU, torch.bfloat16, seed=1, expect_matches=1,
                   expect_ops={PROLOG: 1, "mla.rms_norm.default": 0, "mla.rope.default": 0,
                               "mla.cache_write.default": 0, "aten.linear.default": 1,   # o_proj is left
                               "aten.copy_.default": 2, "mla.paged_attention.default": 1})
    assert check.record.matches_by_rule == {"mla prolog": 1}
    # the caches are written back last, from the prolog's updated-cache outputs
    FileCheck().check(f"torch.ops.{PROLOG}(").check("torch.ops.mla.paged_attention.default(") \
        .check_count("torch.ops.aten.copy_.default(latent_cache", 1).check("copy_.default(rope_cache") \
        .run(gm.code)
    prolog = next(n for n in gm.graph.nodes if str(n.target) == PROLOG)
    assert prolog.kwargs["cache_mode"] == "PA_BSND"
    assert prolog.kwargs["cache_index"].name == "slot_mapping"
    # weights are handed over as new [in, out] constants, cast to FRACTAL_NZ once (the kernel's
    # documented format for weight_dq, weight_uq_qr, weight_dkv_kr); the layer's own are untouched
    layer = _layer(V3_NPU, torch.bfloat16)
    w_dq = getattr(gm, prolog.args[1].target)
    assert torch.equal(w_dq, layer.q_a_proj.weight.t())
    assert w_dq.untyped_storage().data_ptr() != layer.q_a_proj.weight.untyped_storage().data_ptr()
    for index in (1, 2, 4):
        assert npu_format(getattr(gm, prolog.args[index].target)) == ACL_FORMAT_FRACTAL_NZ
    assert npu_format(getattr(gm, prolog.args[3].target)) != ACL_FORMAT_FRACTAL_NZ   # weight_uk stays ND


def test_fuse_mla_prolog_does_not_fire_on_fp32():
    """The kernel takes bf16 tokens: an fp32 model keeps the unfused prolog (and says why)."""
    gm = _prepared(V3_NPU, torch.float32, fuse_mla_prolog)
    notes = _no_fire(fuse_mla_prolog, gm).record.notes
    assert len(notes) == 1 and "bfloat16" in notes[0] and "float32" in notes[0], notes
    FileCheck().check_not(f"torch.ops.{PROLOG}(").check("torch.ops.mla.cache_write.default(").run(gm.code)


# DeepSeek-V2's hidden size (5120) with V3's attention dims: outside the prolog's He (7168/7680/6144)
V2_HIDDEN = dataclasses.replace(V3_NPU, hidden_size=5120, name="v2-hidden")


@pytest.mark.parametrize("config, why", [(V2_HIDDEN, "He (hidden size)=5120"), (V3_TINY, "He (hidden size)=64")],
                         ids=["deepseek-v2-hidden", "v3-tiny"])
def test_fuse_mla_prolog_does_not_fire_outside_its_documented_limits(config, why):
    """The prolog fuses only where npu_mla_prolog_v3's documented limits hold; elsewhere the cache
    write stays for the functional writer, and the note names the limit and its doc line."""
    gm = _prepared(config, torch.bfloat16, fuse_mla_prolog)
    notes = _no_fire(fuse_mla_prolog, gm).record.notes
    assert len(notes) == 1 and why in notes[0] and "L9652" in notes[0], notes


def test_fuse_mla_prolog_does_not_fire_without_q_lora():
    gm = _prepared(V2_LITE_NPU, torch.bfloat16, fuse_mla_prolog)
    notes = _no_fire(fuse_mla_prolog, gm).record.notes
    assert len(notes) == 1 and "q_lora" in notes[0], notes


# ---- fuse_kv_rmsnorm_rope_cache_functional --------------------------------------------------

@pytest.mark.parametrize("config, dtype", [(V2_LITE_TINY, torch.float32), (V3_TINY, torch.float32)],
                         ids=["v2lite", "v3-fp32"])
def test_fuse_kv_rmsnorm_rope_cache_functional(config, dtype):
    gm = _prepared(config, dtype, fuse_kv_rmsnorm_rope_cache_functional)
    norms = 2 if config.q_lora_rank else 1           # q_a_layernorm only with q_lora
    _check(fuse_kv_rmsnorm_rope_cache_functional, gm, config, dtype, seed=2, expect_matches=1,
           expect_ops={KV_FUNCTIONAL: 1, "mla.cache_write.default": 0, "mla.rms_norm.default": norms - 1,
                       "mla.rope.default": 1, "aten.copy_.default": 2})   # the q rope is left
    fused = next(n for n in gm.graph.nodes if str(n.target) == KV_FUNCTIONAL)
    assert fused.kwargs == {"epsilon": config.rms_norm_eps, "cache_mode": "PA"}
    # the attention reads the updated caches (the kernel's outputs), not the stale inputs
    attn = next(n for n in gm.graph.nodes if n.target is mla.paged_attention.default)
    latent, rope = attn.args[2:4]
    assert (latent.target, latent.args) == (operator.getitem, (fused, 1))
    assert (rope.target, rope.args) == (operator.getitem, (fused, 0))


def test_fuse_kv_rmsnorm_rope_cache_functional_does_not_fire_after_the_prolog():
    """The fused prolog already wrote the caches: no cache write is left to fuse."""
    gm = _prepared(V3_NPU, torch.bfloat16, fuse_kv_rmsnorm_rope_cache_functional)
    FileCheck().check(f"torch.ops.{PROLOG}(").run(gm.code)
    _no_fire(fuse_kv_rmsnorm_rope_cache_functional, gm)
    FileCheck().check_not(f"torch.ops.{KV_FUNCTIONAL}(").run(gm.code)


# ---- lengths_as_tensors ---------------------------------------------------------------------

@pytest.mark.parametrize("config, dtype", [(V2_LITE_NPU, torch.bfloat16), (V3_NPU, torch.bfloat16)],
                         ids=["v2lite", "v3-bf16"])
def test_lengths_as_tensors(config, dtype):
    gm = _prepared(config, dtype, lengths_as_tensors)
    assert "seq_lens_list" in graph_meta(gm).input_names
    fia = next(n for n in gm.graph.nodes if str(n.target) == NPU_FIA)
    kwargs = dict(fia.kwargs)
    assert kwargs["actual_seq_lengths_kv"].name == "seq_lens_list"
    _check(lengths_as_tensors, gm, config, dtype, seed=3, expect_matches=1,
           expect_ops={NPU_FIA: 0, AIR_FIA: 1})
    air = next(n for n in gm.graph.nodes if str(n.target) == AIR_FIA)
    # int64: GE's FusedInferAttentionScore takes its lengths as DT_INT64 only (no cast in the graph)
    lengths = air.kwargs["actual_seq_lengths_kv"]
    assert lengths.op == "placeholder" and lengths.name == "seq_lens_int64"
    assert lengths.meta["val"].dtype == torch.int64
    assert {k: v for k, v in air.kwargs.items() if k != "actual_seq_lengths_kv"} == \
        {k: v for k, v in kwargs.items() if k != "actual_seq_lengths_kv"}
    # the host list is no longer read: its graph input is gone
    assert "seq_lens_list" not in graph_meta(gm).input_names
    assert "seq_lens_list" not in [n.name for n in gm.graph.nodes if n.op == "placeholder"]


def test_lengths_as_tensors_does_not_fire_without_fia():
    gm = _prepared(V2_LITE_TINY, torch.float32, lower_paged_attention)     # attention not lowered yet
    inputs = list(graph_meta(gm).input_names)
    _no_fire(lengths_as_tensors, gm)
    assert graph_meta(gm).input_names == inputs


def test_lengths_as_tensors_leaves_a_list_with_no_tensor_form():
    """A mixed batch's FIAs read the lengths of their part of the batch (decode_*/prefill_* host
    lists), which have no tensor form: left as they are, and said so."""
    pipeline = target_pipeline("npu", "mixed")
    gm = _prepared(V2_LITE_NPU, torch.bfloat16, pipeline[-1], phase="mixed", pipeline=pipeline)
    FileCheck().check_count(f"torch.ops.{NPU_FIA}(", 2).run(gm.code)
    inputs = list(graph_meta(gm).input_names)
    assert {"decode_seq_lens_list", "prefill_query_ends_list", "prefill_context_ends_list"} <= set(inputs)
    notes = _no_fire(lengths_as_tensors, gm).record.notes
    assert any("no tensor form" in note for note in notes), notes
    assert graph_meta(gm).input_names == inputs


# ---- decompose_linear -----------------------------------------------------------------------

@pytest.mark.parametrize("config, dtype", [(V2_LITE_TINY, torch.float32), (V3_NPU, torch.bfloat16)],
                         ids=["v2lite", "v3-bf16"])
def test_decompose_linear(config, dtype):
    gm = _prepared(config, dtype, decompose_linear)
    linears = sum(1 for n in gm.graph.nodes if n.target is aten.linear.default)
    # v2lite: q_proj, kv_a, o_proj; v3 bf16: o_proj only (the prolog took the others)
    assert linears == (1 if dtype is torch.bfloat16 else 3)
    mms = sum(1 for n in gm.graph.nodes if n.target is aten.mm.default)
    _check(decompose_linear, gm, config, dtype, seed=4, expect_matches=linears,
           expect_ops={"aten.linear.default": 0, "aten.mm.default": mms + linears, "aten.t.default": linears})
    for node in gm.graph.nodes:
        if node.target is aten.mm.default and node.args[1].target is aten.t.default:
            assert node.args[1].args[0].op == "get_attr"     # the weight, transposed as a view


def test_decompose_linear_does_not_fire_on_a_3d_input():
    """mm takes 2-d inputs only: a linear over [B, T, K] is left as it is."""
    check_pass(decompose_linear, lambda x, w: aten.linear.default(x, w), (torch.randn(2, 3, 4), torch.randn(5, 4)),
               expect_ops={"aten.linear.default": 1, "aten.mm.default": 0}, expect_changed=False, expect_matches=0)


# ---- insert_multistream_scopes --------------------------------------------------------------

def test_insert_multistream_scopes_v2_lite():
    """q_proj -> rope and kv_a -> the cache writer share only inputs: the smaller (kv) branch
    moves into a secondary-stream scope, and the attention's query waits for it."""
    gm = _prepared(V2_LITE_NPU, torch.bfloat16)
    check = _check(insert_multistream_scopes, gm, V2_LITE_NPU, torch.bfloat16, seed=5, expect_matches=1,
                   expect_ops={"air.scope_enter.default": 1, "air.scope_exit.default": 1,
                               "air.wait_tensor.default": 1})
    FileCheck().check("torch.ops.air.scope_enter.default(").check("_user_stream_label").check("mla_secondary") \
        .check("torch.ops.aten.mm.default(").check(f"torch.ops.{KV_FUNCTIONAL}(") \
        .check("torch.ops.air.scope_exit.default(") \
        .check("torch.ops.npu.npu_interleave_rope.default(").check("torch.ops.air.wait_tensor.default(") \
        .check(f"torch.ops.{AIR_FIA}(").run(gm.code)
    nodes = list(gm.graph.nodes)
    enter = next(i for i, n in enumerate(nodes) if n.target is torch.ops.air.scope_enter.default)
    exit_ = next(i for i, n in enumerate(nodes) if n.target is torch.ops.air.scope_exit.default)
    inside = [str(n.target) for n in nodes[enter + 1: exit_]]
    assert KV_FUNCTIONAL in inside and "npu.npu_interleave_rope.default" not in inside
    attn = next(n for n in nodes if str(n.target) == AIR_FIA)
    assert attn.args[0].target is torch.ops.air.wait_tensor.default
    dependency = attn.args[0].args[1]         # an output of the kv kernel, the branch's last kernel
    assert dependency.target is operator.getitem and str(dependency.args[0].target) == KV_FUNCTIONAL
    assert any("mla_secondary" in note for note in check.record.notes)


def test_insert_multistream_scopes_does_not_fire_on_the_fused_prolog():
    """V3 bf16: one prolog kernel feeds the attention; one producer chain, nothing to overlap."""
    gm = _prepared(V3_NPU, torch.bfloat16)
    notes = _no_fire(insert_multistream_scopes, gm).record.notes
    assert notes and all("one producer chain" in note for note in notes), notes
    FileCheck().check_not("torch.ops.air.scope_enter.default(").run(gm.code)

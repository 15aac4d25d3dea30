"""Direct tests of the NPU pipeline's passes on captured MLA graphs.

Each pass gets: structure (FileCheck op counts on gm.code), its match count as the PassManager
records it (the verifier runs too), numerics against the graph before the pass (output and
both caches), and a case where it must not fire. All of it goes through the public harness
passes.testing.check_pass; a pass may add graph inputs, so each graph is called with its own
inputs via graph_inputs(gm, Call(...)).
"""
import copy
import functools

import pytest
import torch
from conftest import TOL, V2_LITE_TINY, V3_TINY, randomize
from torch.testing import FileCheck

from mla_graph import MLAAttention, MLAConfig, capture
from mla_graph.capture import Call, graph_inputs
from mla_graph.checking import random_batch
from mla_graph.npu import ensure_npu_ops
from mla_graph.targets import _npu_pipeline
from passes import PassManager, PassResult, remove_noop_views
from passes.absorb import absorb_kv_weights
from passes.cost_model import Dims, REPRESENTATIVE, attention_costs, choose_attention_form
from passes.graph_utils import call
from passes.npu_lower import (fuse_kv_rmsnorm_rope_cache, lower_context_attention, lower_paged_attention,
                              lower_rms_norm, lower_rope)
from passes.page import page_latent_attention
from passes.testing import PassCheck, check_pass, snapshot

aten, mla = torch.ops.aten, torch.ops.mla
BLOCK = 16
REQUESTS = {
    "decode": [(1, 37), (1, 5), (1, 130)],
    "prefill": [(9, 0), (6, 21)],
    "mixed": [(1, 19), (1, 3), (7, 0), (5, 12)],
}
CONFIGS = pytest.mark.parametrize("config", [V3_TINY, V2_LITE_TINY], ids=["v3", "v2lite"])

FIA = "npu.npu_fused_infer_attention_score.default"


@pytest.fixture(scope="module", autouse=True)
def _npu_ops():
    ensure_npu_ops()


def _layer(config: MLAConfig, dtype: torch.dtype = torch.float32) -> MLAAttention:
    return _random_layer(config, dtype)


@functools.lru_cache(maxsize=None)
def _random_layer(config: MLAConfig, dtype: torch.dtype) -> MLAAttention:
    return randomize(MLAAttention(config, dtype=dtype), seed=3)


def _prepared(layer: MLAAttention, phase: str, upto) -> torch.fx.GraphModule:
    """The captured graph with every pipeline pass before `upto` already run, in pipeline order."""
    gm = _capture(layer, phase)
    pipeline = _npu_pipeline(phase)
    PassManager(pipeline[: pipeline.index(upto)]).run(gm)
    return gm


@functools.lru_cache(maxsize=None)
def _captured(config: MLAConfig, dtype: torch.dtype, phase: str):
    return capture(_layer(config, dtype), phase, block_size=BLOCK)


def _capture(layer: MLAAttention, phase: str):
    """A fresh copy of the layer's captured graph (one trace per layer and phase, per session)."""
    assert layer is _layer(layer.config, layer.dtype)
    return snapshot(_captured(layer.config, layer.dtype, phase))


def _count(gm, op: str, n: int) -> None:
    if n == 0:
        FileCheck().check_not(f"torch.ops.{op}(").run(gm.code)
    else:
        FileCheck().check_count(f"torch.ops.{op}(", n, exactly=True).run(gm.code)


def _n(gm, target) -> int:
    return sum(1 for node in gm.graph.nodes if node.op == "call_function" and node.target is target)


def _batch_inputs(layer: MLAAttention, phase: str, seed: int):
    """make_inputs for check_pass: one fixed random batch of `phase`, fresh (cache cloned) per call."""
    def make(gm):
        batch = random_batch(layer, REQUESTS[phase], block_size=BLOCK, seed=seed)
        return graph_inputs(gm, Call(batch.hidden_states, batch.positions, batch.cache.clone(), batch.metadata,
                                     layer.cos_sin))
    return make


def _check(pass_fn, gm, layer, phase: str, *, seed: int, **expect) -> PassCheck:
    """Run `pass_fn` on `gm` through check_pass: structure/matches as given in `expect`, the output
    and both caches against the graph before the pass at the layer dtype's tolerance."""
    check = check_pass(pass_fn, gm, make_inputs=_batch_inputs(layer, phase, seed), compare_mutated=True,
                       tolerances=TOL, **expect)
    # the batch's fresh tokens were written, so both caches were compared (not skipped as unchanged)
    assert check.mutated == ["latent_cache", "rope_cache"]
    return check


def _no_fire(gm, pass_fn) -> PassCheck:
    """The pass reports no change and no match; check_pass also holds it to an unchanged gm.code."""
    return check_pass(pass_fn, gm, compare_numerics=False, expect_changed=False, expect_matches=0)


def _scale_output(gm) -> PassResult:
    """A wrong rewrite: the output times 1.001."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        scaled = call(gm.graph, aten.mul.Tensor, out.args[0], 1.001)
    out.args = (scaled,)
    return PassResult(changed=True, matches=1)


def _scale_latent_cache(gm) -> PassResult:
    """A wrong rewrite that leaves the output alone: the latent cache times 1.001 at the end."""
    latent = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == "latent_cache")
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        call(gm.graph, aten.mul_.Tensor, latent, 1.001)
    return PassResult(changed=True, matches=1)


@pytest.mark.parametrize("wrong", [_scale_output, _scale_latent_cache])
def test_numerics_check_catches_a_wrong_rewrite(wrong):
    """The comparison fails when the graph after a pass computes another output or cache."""
    layer = _layer(V3_TINY)
    with pytest.raises(AssertionError, match=f"{wrong.__name__} changed the numerics"):
        _check(wrong, _capture(layer, "decode"), layer, "decode", seed=0)


# ---- choose_attention_form ------------------------------------------------------------------

@CONFIGS
@pytest.mark.parametrize("phase, form", [("decode", "absorbed"), ("prefill", "decompressed")])
def test_choose_attention_form_tiny(config, phase, form):
    layer = _layer(config)
    gm = _prepared(layer, phase, choose_attention_form)
    assert "mla_attention_form" not in gm.meta
    # meta only: changed=False, and check_pass holds that to an untouched gm.code
    check = _check(choose_attention_form, gm, layer, phase, seed=1, expect_changed=False)
    assert gm.meta["mla_attention_form"] == form
    assert "mla_attention_form" not in check.before.meta
    assert any(note.endswith(f"-> {form}") for note in check.record.notes)


@pytest.fixture(scope="module")
def v3_full_layer():
    return MLAAttention(MLAConfig.preset("deepseek-v3"), dtype=torch.bfloat16).requires_grad_(False)


@pytest.mark.parametrize("phase, form", [("decode", "absorbed"), ("prefill", "decompressed")])
def test_choose_attention_form_full_size_v3(v3_full_layer, phase, form):
    gm = capture(v3_full_layer, phase, block_size=BLOCK)      # capture only: no full-size numerics
    record = PassManager([remove_noop_views, choose_attention_form]).run(gm).records[-1]
    assert gm.meta["mla_attention_form"] == form
    assert record.changed is False


def test_choose_attention_form_does_not_fire_without_decompressed_attention():
    gm = _prepared(_layer(V3_TINY), "decode", page_latent_attention)   # absorbed already
    del gm.meta["mla_attention_form"]
    _no_fire(gm, choose_attention_form)
    assert "mla_attention_form" not in gm.meta


def test_attention_costs_by_hand():
    # V3_TINY in fp32, decode's representative batch: 32 requests x 1 new token x 4096 context.
    d = Dims(heads=4, qk_nope=16, rope=8, latent=48, v=12, dtype_bytes=4)
    costs = attention_costs(d, 32, 1, 4096)
    C, T, pairs = 131072, 32, 131072          # context tokens, new tokens, query-key pairs
    # decompressed: kv_b_proj over the context (48 -> 4 x (16 + 12)), QK^T over 24 dims, PV over 12
    kv_b = 2 * C * 48 * 4 * 28                 # 1_409_286_144
    qk, pv = 2 * pairs * 4 * 24, 2 * pairs * 4 * 12
    assert costs["decompressed"].flops == kv_b + qk + pv == 1_409_286_144 + 25_165_824 + 12_582_912
    # bytes: the latent + rope cache, K (24) and V (12) per head written and read once, the weight
    assert costs["decompressed"].bytes == 4 * (C * 56 + 2 * C * 4 * 36 + 48 * 4 * 28) == 180_376_576
    # absorbed: q_nope @ W_UK (16 -> 48), MQA over 56 dims with 48-wide values, o @ W_UV (48 -> 12)
    flops = 2 * T * 4 * 16 * 48 + 2 * pairs * 4 * 56 + 2 * pairs * 4 * 48 + 2 * T * 4 * 48 * 12
    assert costs["absorbed"].flops == flops == 196608 + 58_720_256 + 50_331_648 + 147456
    assert costs["absorbed"].bytes == 4 * (C * 56 + 5376 + 2 * T * 4 * 48)
    assert costs["absorbed"].seconds == max(flops / 300e12, costs["absorbed"].bytes / 1.6e12)
    assert costs["absorbed"].seconds < costs["decompressed"].seconds
    assert REPRESENTATIVE["decode"] == (32, 1, 4096)   # the batch the graph pass costs decode at


# ---- absorb_kv_weights ----------------------------------------------------------------------

def _kv_b_users(gm):
    attrs = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == "kv_b_proj.weight"]
    return [u for a in attrs for u in a.users]


@CONFIGS
def test_absorb_kv_weights(config):
    layer = _layer(config)
    weight = layer.kv_b_proj.weight
    snapshot, version = weight.clone(), weight._version
    gm = _prepared(layer, "decode", absorb_kv_weights)
    assert gm.meta["mla_attention_form"] == "absorbed"
    assert [u.target for u in _kv_b_users(gm)] == [aten.linear.default]
    linears = _n(gm, aten.linear.default)
    # structure: kv_b_proj's linear is gone, two bmm (q_nope @ W_UK, o @ W_UV) took its place
    _check(absorb_kv_weights, gm, layer, "decode", seed=2, expect_matches=1, expect_changed=True,
           expect_ops={"aten.linear.default": linears - 1, "aten.bmm.default": 2, "mla.attention.default": 1})
    assert _kv_b_users(gm) == []
    for node in gm.graph.nodes:
        if node.target is aten.linear.default:
            assert not (node.args[1].op == "get_attr" and node.args[1].target == "kv_b_proj.weight")
    attention = next(n for n in gm.graph.nodes if n.target is mla.attention.default)
    c = config
    assert attention.args[1].meta["val"].shape[-2:] == (1, c.kv_lora_rank + c.qk_rope_head_dim)  # MQA keys
    assert attention.args[2].meta["val"].shape[-2:] == (1, c.kv_lora_rank)
    # the folded weights are new tensors; the layer's weight is untouched
    folded = {n.target: getattr(gm, n.target) for n in gm.graph.nodes
              if n.op == "get_attr" and n.target.endswith(("_w_uk", "_w_uv"))}
    assert len(folded) == 2
    shapes = sorted(tuple(t.shape) for t in folded.values())
    H, P, L, V = layer.num_heads, c.qk_nope_head_dim, c.kv_lora_rank, c.v_head_dim
    assert shapes == sorted([(H, P, L), (H, L, V)])
    for t in folded.values():
        assert t.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr()
    w = snapshot.view(H, P + V, L)
    w_uk = next(t for name, t in folded.items() if name.endswith("_w_uk"))
    torch.testing.assert_close(w_uk, w[:, :P], rtol=0, atol=0)
    assert weight._version == version and torch.equal(weight, snapshot)
    assert layer.kv_b_proj.weight is weight


def test_absorb_kv_weights_bf16():
    layer = _layer(V3_TINY, torch.bfloat16)
    gm = _prepared(layer, "decode", absorb_kv_weights)
    _check(absorb_kv_weights, gm, layer, "decode", seed=3, expect_matches=1, expect_ops={"aten.bmm.default": 2})


def test_absorb_kv_weights_does_not_fire_when_decompressed_won():
    layer = _layer(V3_TINY)
    gm = _prepared(layer, "decode", absorb_kv_weights)
    gm.meta["mla_attention_form"] = "decompressed"
    _no_fire(gm, absorb_kv_weights)
    assert [u.target for u in _kv_b_users(gm)] == [aten.linear.default]
    prefill = _prepared(layer, "prefill", absorb_kv_weights)   # the cost model said decompressed
    assert prefill.meta["mla_attention_form"] == "decompressed"
    _no_fire(prefill, absorb_kv_weights)


# ---- page_latent_attention ------------------------------------------------------------------

@CONFIGS
@pytest.mark.parametrize("phase", ["decode", "mixed"])
def test_page_latent_attention(config, phase):
    layer = _layer(config)
    gm = _prepared(layer, phase, page_latent_attention)
    _count(gm, "mla.gather_paged.default", 2)
    _check(page_latent_attention, gm, layer, phase, seed=4, expect_matches=1,
           expect_ops={"mla.paged_attention.default": 1, "mla.attention.default": 0, "mla.gather_paged.default": 0})


@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_page_latent_attention_does_not_fire_without_absorb(phase):
    gm = _capture(_layer(V3_TINY), phase)
    _no_fire(gm, page_latent_attention)
    _count(gm, "mla.paged_attention.default", 0)


# ---- fuse_kv_rmsnorm_rope_cache -------------------------------------------------------------

FUSED = "npu.npu_kv_rmsnorm_rope_cache_v2.default"


@CONFIGS
@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_fuse_kv_rmsnorm_rope_cache(config, phase):
    layer = _layer(config)
    gm = _prepared(layer, phase, fuse_kv_rmsnorm_rope_cache)
    norms, ropes = _n(gm, mla.rms_norm.default), _n(gm, mla.rope.default)
    assert norms == (2 if config.q_lora_rank else 1) and ropes == 2    # q and kv each
    _check(fuse_kv_rmsnorm_rope_cache, gm, layer, phase, seed=5, expect_matches=1,
           expect_ops={FUSED: 1, "mla.cache_write.default": 0, "mla.rms_norm.default": norms - 1,
                       "mla.rope.default": ropes - 1})
    fused = next(n for n in gm.graph.nodes if n.target is torch.ops.npu.npu_kv_rmsnorm_rope_cache_v2.default)
    assert fused.kwargs["cache_mode"] == "PA"
    assert fused.kwargs["epsilon"] == config.rms_norm_eps


def test_fuse_kv_rmsnorm_rope_cache_does_not_fire_when_normed_latent_has_another_user():
    gm = _prepared(_layer(V3_TINY), "decode", fuse_kv_rmsnorm_rope_cache)
    write = next(n for n in gm.graph.nodes if n.target is mla.cache_write.default)
    normed = write.args[0]
    assert normed.target is mla.rms_norm.default
    with gm.graph.inserting_after(normed):
        call(gm.graph, aten.neg.default, normed)
    gm.recompile()
    record = _no_fire(gm, fuse_kv_rmsnorm_rope_cache).record
    assert any("other users" in note for note in record.notes)
    _count(gm, "mla.cache_write.default", 1)
    _count(gm, FUSED, 0)


def test_fuse_kv_rmsnorm_rope_cache_does_not_fire_after_rms_norm_was_lowered():
    gm = _prepared(_layer(V3_TINY), "decode", fuse_kv_rmsnorm_rope_cache)
    PassManager([lower_rms_norm]).run(gm)       # out of order: the cache write reads npu_rms_norm now
    _no_fire(gm, fuse_kv_rmsnorm_rope_cache)
    _count(gm, "mla.cache_write.default", 1)


# ---- lower_rope / lower_rms_norm ------------------------------------------------------------

@CONFIGS
@pytest.mark.parametrize("phase", ["decode", "mixed"])
def test_lower_rope(config, phase):
    layer = _layer(config)
    gm = _prepared(layer, phase, lower_rope)
    ropes = _n(gm, mla.rope.default)
    assert ropes == 1                  # the q rope; the k rope went into the cache-write fusion
    _check(lower_rope, gm, layer, phase, seed=6, expect_matches=ropes,
           expect_ops={"npu.npu_interleave_rope.default": ropes, "mla.rope.default": 0})
    _no_fire(gm, lower_rope)


@CONFIGS
@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_lower_rms_norm(config, phase):
    layer = _layer(config)
    gm = _prepared(layer, phase, lower_rms_norm)
    norms = _n(gm, mla.rms_norm.default)
    assert norms == (1 if config.q_lora_rank else 0)    # q_a_layernorm exists only with q_lora
    if norms == 0:
        _no_fire(gm, lower_rms_norm)
        _count(gm, "npu.npu_rms_norm.default", 0)
        return
    _check(lower_rms_norm, gm, layer, phase, seed=7, expect_matches=norms,
           expect_ops={"npu.npu_rms_norm.default": norms, "mla.rms_norm.default": 0})
    _no_fire(gm, lower_rms_norm)


def test_lower_rms_norm_lowers_every_norm_on_a_raw_capture():
    """Run alone on the captured graph, it lowers q_a_layernorm and kv_a_layernorm both."""
    layer = _layer(V3_TINY)
    gm = _capture(layer, "prefill")
    _check(lower_rms_norm, gm, layer, "prefill", seed=8, expect_matches=2,
           expect_ops={"npu.npu_rms_norm.default": 2})


# ---- lower_paged_attention ------------------------------------------------------------------

@CONFIGS
@pytest.mark.parametrize("phase, layout, sparse, new_inputs", [
    ("decode", "BNSD", 0, ["seq_lens_list"]),
    ("mixed", "TND", 3, ["seq_lens_list", "query_ends_list"]),
])
def test_lower_paged_attention(config, phase, layout, sparse, new_inputs):
    layer = _layer(config)
    gm = _prepared(layer, phase, lower_paged_attention)
    inputs = list(gm.meta["mla_inputs"])
    _check(lower_paged_attention, gm, layer, phase, seed=9, expect_matches=1,
           expect_ops={FIA: 1, "mla.paged_attention.default": 0})
    fia = next(n for n in gm.graph.nodes if n.target is torch.ops.npu.npu_fused_infer_attention_score.default)
    assert fia.kwargs["input_layout"] == layout
    assert fia.kwargs["sparse_mode"] == sparse
    assert fia.kwargs["num_heads"] == layer.num_heads and fia.kwargs["num_key_value_heads"] == 1
    assert fia.kwargs["block_size"] == BLOCK
    assert fia.kwargs["block_table"].name == "block_table"
    mask = fia.kwargs["atten_mask"]
    assert (mask is None) == (layout == "BNSD")
    assert gm.meta["mla_inputs"] == inputs + new_inputs


def test_lower_paged_attention_does_not_fire_without_paged_attention():
    gm = _prepared(_layer(V3_TINY), "prefill", lower_paged_attention)   # decompressed: no paged attention
    inputs = list(gm.meta["mla_inputs"])
    _no_fire(gm, lower_paged_attention)
    assert gm.meta["mla_inputs"] == inputs


# ---- lower_context_attention ----------------------------------------------------------------

@CONFIGS
def test_lower_context_attention(config):
    layer = _layer(config)
    gm = _prepared(layer, "prefill", lower_context_attention)
    assert gm.meta["mla_attention_form"] == "decompressed"
    inputs = list(gm.meta["mla_inputs"])
    _check(lower_context_attention, gm, layer, "prefill", seed=10, expect_matches=1,
           expect_ops={FIA: 1, "mla.attention.default": 0, "mla.gather_paged.default": 0})
    fia = next(n for n in gm.graph.nodes if n.target is torch.ops.npu.npu_fused_infer_attention_score.default)
    assert (fia.kwargs["input_layout"], fia.kwargs["sparse_mode"]) == ("TND", 3)
    assert fia.kwargs["num_key_value_heads"] == layer.num_heads
    added = gm.meta["mla_inputs"][len(inputs):]
    assert gm.meta["mla_inputs"][: len(inputs)] == inputs
    assert sorted(added) == ["context_ends_list", "context_slots", "query_ends_list"]


def test_lower_context_attention_bf16():
    layer = _layer(V2_LITE_TINY, torch.bfloat16)
    gm = _prepared(layer, "prefill", lower_context_attention)
    _check(lower_context_attention, gm, layer, "prefill", seed=11, expect_matches=1, expect_ops={FIA: 1})


def test_lower_context_attention_does_not_fire_on_absorbed_decode():
    gm = _prepared(_layer(V3_TINY), "decode", lower_context_attention)
    assert gm.meta["mla_attention_form"] == "absorbed"
    inputs = list(gm.meta["mla_inputs"])
    _no_fire(gm, lower_context_attention)
    assert gm.meta["mla_inputs"] == inputs


def test_lowered_graph_can_be_deep_copied():
    """No pass leaves graph Nodes in gm.meta (a deep copy of the module must still work)."""
    layer = _layer(V3_TINY, torch.float32)
    gm = _capture(layer, "decode")
    PassManager([fuse_kv_rmsnorm_rope_cache, lower_rope]).run(gm)
    clone = copy.deepcopy(gm)
    assert clone.code == gm.code

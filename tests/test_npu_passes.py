"""Direct tests of the NPU pipeline's passes on captured MLA graphs.

Each pass gets: structure (FileCheck op counts on gm.code), its match count as the PassManager
records it (the verifier runs too), numerics against the graph before the pass (output and
both caches), and a case where it must not fire. All of it goes through the public harness
mla_graph.testing.check_pass; a pass may add graph inputs, so each graph is called with its own
inputs via graph_inputs(gm, Call(...)).

Two kinds of config: the tiny ones (V3_TINY, V2_LITE_TINY), which no NPU kernel's documented
limits admit (latent 48/32, rope 8, 4 heads), so their lowering takes the aten fallbacks; and
V3_NPU / V2_LITE_NPU in bf16, the smallest configs FIA (MLA BNSD and TND) admits, for the kernel
structure.
"""
import copy
import functools

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
from mla_graph.targets import pipeline as target_pipeline
from mla_graph.passes import PassManager, PassResult, remove_noop_views
from mla_graph.passes.absorb import absorb_kv_weights
from mla_graph.passes.attention_fallback import FALLBACK_RULE, lower_paged_attention_to_aten
from mla_graph.passes.cost_model import Dims, REPRESENTATIVE, attention_costs, choose_attention_form
from mla_graph.passes.graph_utils import call
from mla_graph.passes.npu_lower import (choose_npu_attention_form, fuse_kv_rmsnorm_rope_cache, lower_context_attention,
                              lower_paged_attention, lower_rms_norm, lower_rope)
from mla_graph.passes.page import page_latent_attention
from mla_graph.passes.split_mixed import split_mixed_batch
from mla_graph.testing import PassCheck, check_pass, snapshot

aten, mla = torch.ops.aten, torch.ops.mla
f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
BLOCK = 16
REQUESTS = {
    "decode": [(1, 37), (1, 5), (1, 130)],
    "prefill": [(9, 0), (6, 21)],
    # two 40-token prefill chunks: over FIA MLA mode's 16 query tokens per request
    "mixed": [(1, 19), (1, 3), (40, 0), (40, 12)],
}
CONFIGS = pytest.mark.parametrize("config", [V3_TINY, V2_LITE_TINY], ids=["v3", "v2lite"])

FIA = "npu.npu_fused_infer_attention_score.default"


def _id(value):
    """Test ids: a config by its name, a dtype as fp32/bf16/fp16; anything else pytest's default."""
    if isinstance(value, MLAConfig):
        return value.name
    return {f32: "fp32", bf16: "bf16", f16: "fp16"}.get(value) if isinstance(value, torch.dtype) else None


@pytest.fixture(scope="module", autouse=True)
def _npu_ops():
    ensure_npu_ops()


def _layer(config: MLAConfig, dtype: torch.dtype = f32) -> MLAAttention:
    return _random_layer(config, dtype)


@functools.lru_cache(maxsize=None)
def _random_layer(config: MLAConfig, dtype: torch.dtype) -> MLAAttention:
    # the NPU-sized configs at std 0.02: at 0.2 their logits are huge and bf16 noise dominates
    std = 0.02 if config in (V3_NPU, V2_LITE_NPU) else 0.2
    return randomize(MLAAttention(config, dtype=dtype), seed=3, std=std)


def _prepared(layer: MLAAttention, phase: str, upto, *, block: int = BLOCK, pipeline=None) -> torch.fx.GraphModule:
    """The captured graph with every pipeline pass before `upto` already run, in pipeline order."""
    gm = _capture(layer, phase, block)
    pipeline = target_pipeline("npu", phase) if pipeline is None else pipeline
    PassManager(pipeline[: pipeline.index(upto)]).run(gm)
    return gm


@functools.lru_cache(maxsize=None)
def _captured(config: MLAConfig, dtype: torch.dtype, phase: str, block: int):
    return capture(_layer(config, dtype), phase, block_size=block)


def _capture(layer: MLAAttention, phase: str, block: int = BLOCK):
    """A fresh copy of the layer's captured graph (one trace per layer, phase and block size)."""
    assert layer is _layer(layer.config, layer.dtype)
    return snapshot(_captured(layer.config, layer.dtype, phase, block))


def _count(gm, op: str, n: int) -> None:
    if n == 0:
        FileCheck().check_not(f"torch.ops.{op}(").run(gm.code)
    else:
        FileCheck().check_count(f"torch.ops.{op}(", n, exactly=True).run(gm.code)


def _n(gm, target) -> int:
    return sum(1 for node in gm.graph.nodes if node.op == "call_function" and node.target is target)


def _nodes(gm, target) -> list:
    return [node for node in gm.graph.nodes if node.op == "call_function" and node.target is target]


def _fias(gm) -> list:
    return _nodes(gm, torch.ops.npu.npu_fused_infer_attention_score.default)


def _batch_inputs(layer: MLAAttention, phase: str, seed: int, block: int = BLOCK, nan_outside_context=False):
    """make_inputs for check_pass: one fixed random batch of `phase`, fresh (cache cloned) per call.
    With nan_outside_context, every cache slot outside the requests' contexts holds NaN."""
    def make(gm):
        batch = random_batch(layer, REQUESTS[phase], block_size=block, seed=seed)
        cache = batch.cache.clone()
        if nan_outside_context:
            _nan_outside_context(cache, batch.metadata)
        return graph_inputs(gm, Call(batch.hidden_states, batch.positions, cache, batch.metadata, layer.cos_sin))
    return make


def _nan_outside_context(cache, metadata) -> None:
    bs = cache.block_size
    context = torch.zeros(cache.num_blocks * bs, dtype=torch.bool)
    for row, seq_len in zip(metadata.block_table.tolist(), metadata.seq_lens.tolist()):
        slots = torch.tensor(row).repeat_interleave(bs) * bs + torch.arange(bs).repeat(len(row))
        context[slots[:seq_len]] = True
    for part in (cache.latent, cache.rope):
        part.view(-1, part.shape[-1])[~context] = float("nan")


def _check(pass_fn, gm, layer, phase: str, *, seed: int, block: int = BLOCK, **expect) -> PassCheck:
    """Run `pass_fn` on `gm` through check_pass: structure/matches as given in `expect`, the output
    and both caches against the graph before the pass at the layer dtype's tolerance."""
    check = check_pass(pass_fn, gm, make_inputs=_batch_inputs(layer, phase, seed, block), compare_mutated=True,
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


# ---- split_mixed_batch ----------------------------------------------------------------------

PART_INPUTS = [f"{part}_{name}" for part in ("decode", "prefill")
               for name in ("block_table", "seq_lens", "query_start_loc")]


@pytest.mark.parametrize("config, dtype", [(V3_TINY, f32), (V2_LITE_TINY, f32), (V3_NPU, bf16)],
                         ids=["v3", "v2lite", "v3npu-bf16"])
def test_split_mixed_batch(config, dtype):
    layer = _layer(config, dtype)
    gm = _prepared(layer, "mixed", split_mixed_batch)
    inputs = list(graph_meta(gm).input_names)
    _count(gm, "mla.attention.default", 1)
    _check(split_mixed_batch, gm, layer, "mixed", seed=12, expect_matches=1, expect_changed=True,
           expect_ops={"mla.attention.default": 2, "mla.gather_paged.default": 4})
    assert graph_meta(gm).input_names[: len(inputs)] == inputs
    assert sorted(graph_meta(gm).input_names[len(inputs):]) == sorted(PART_INPUTS)
    parts = {n.meta["mla_batch_part"]: n for n in _nodes(gm, mla.attention.default)}
    assert sorted(parts) == ["decode", "prefill"]
    for part, attention in parts.items():
        # each part reads its own block table, seq_lens and query_start_loc, not the whole batch's
        q, k, v, qsl, seq_lens, _ = attention.args
        assert (qsl.name, seq_lens.name) == (f"{part}_query_start_loc", f"{part}_seq_lens")
        tables = {n.args[1].name for n in gm.graph.nodes if n.target is mla.gather_paged.default
                  and attention in _users_closure(n)}
        assert tables == {f"{part}_block_table"}
    _no_fire(gm, split_mixed_batch)    # already split: the parts are not split again


def _users_closure(node) -> set:
    seen, stack = set(), [node]
    while stack:
        for user in stack.pop().users:
            if user not in seen:
                seen.add(user)
                stack.append(user)
    return seen


@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_split_mixed_batch_does_not_fire_outside_the_mixed_phase(phase):
    gm = _capture(_layer(V3_TINY), phase)
    inputs = list(graph_meta(gm).input_names)
    record = _no_fire(gm, split_mixed_batch).record
    assert any("only mixed batches are split" in note for note in record.notes)
    assert graph_meta(gm).input_names == inputs


# ---- choose_attention_form / choose_npu_attention_form --------------------------------------

@pytest.mark.parametrize("config, dtype, phase, forms, why_not", [
    (V3_TINY, f32, "decode", {None: "absorbed"}, None),
    (V3_TINY, f32, "prefill", {None: "absorbed"}, "query.dtype=torch.float32"),
    (V2_LITE_TINY, f32, "prefill", {None: "absorbed"}, "query/key D=24"),
    (V2_LITE_TINY, bf16, "prefill", {None: "absorbed"}, "num_heads=4"),
    (V3_NPU, f32, "prefill", {None: "absorbed"}, "query.dtype=torch.float32"),
    (V3_NPU, bf16, "decode", {None: "absorbed"}, None),
    (V3_NPU, bf16, "prefill", {None: "decompressed"}, None),
    (V2_LITE_NPU, bf16, "prefill", {None: "decompressed"}, None),
    (V3_TINY, f32, "mixed", {"decode": "absorbed", "prefill": "absorbed"}, "query.dtype=torch.float32"),
    (V3_NPU, bf16, "mixed", {"decode": "absorbed", "prefill": "decompressed"}, None),
], ids=_id)
def test_choose_npu_attention_form(config, dtype, phase, forms, why_not):
    """The cost model's choice, with decompressed kept only where FIA TND admits it."""
    layer = _layer(config, dtype)
    gm = _prepared(layer, phase, choose_npu_attention_form)
    assert "mla_attention_form" not in gm.meta
    # meta only: changed=False, and check_pass holds that to an untouched gm.code
    check = _check(choose_npu_attention_form, gm, layer, phase, seed=1, expect_changed=False)
    assert "mla_attention_form" not in check.before.meta
    attentions = _nodes(gm, mla.attention.default)
    assert {n.meta.get("mla_batch_part"): n.meta["mla_attention_form"] for n in attentions} == forms
    assert len(check.record.notes) == len(attentions)
    for node in attentions:
        [note] = [n for n in check.record.notes if n.startswith(f"{node.name} ")]
        # the cost model wants decompressed for prefill (parts); FIA TND's limits may overrule it
        overruled = why_not is not None and (node.meta.get("mla_batch_part") or phase) == "prefill"
        assert f"-> {node.meta['mla_attention_form']}" in note
        assert ("not admitted" in note) == overruled
        if overruled:
            assert why_not in note


def test_choose_attention_form_cost_model_alone_picks_decompressed_for_tiny_prefill():
    """Without the FIA admission check the cost model still prefers decompressed for prefill; it is
    choose_npu_attention_form that routes the tiny config to absorbed."""
    layer = _layer(V3_TINY)
    gm = _prepared(layer, "prefill", choose_npu_attention_form)
    check = _check(choose_attention_form, gm, layer, "prefill", seed=1, expect_changed=False)
    assert graph_meta(gm).attention_form == "decompressed"
    assert check.record.notes[-1].endswith("-> decompressed")


@pytest.fixture(scope="module")
def v3_full_layer():
    return MLAAttention(MLAConfig.preset("deepseek-v3"), dtype=torch.bfloat16).requires_grad_(False)


@pytest.mark.parametrize("phase, form", [("decode", "absorbed"), ("prefill", "decompressed")])
def test_choose_attention_form_full_size_v3(v3_full_layer, phase, form):
    """Full DeepSeek-V3 in bf16 (128 heads, q/k 192, v 128): FIA TND admits its decompressed prefill."""
    gm = capture(v3_full_layer, phase, block_size=BLOCK)      # capture only: no full-size numerics
    record = PassManager([remove_noop_views, choose_npu_attention_form]).run(gm).records[-1]
    assert graph_meta(gm).attention_form == form
    assert record.changed is False
    assert not any("not admitted" in note for note in record.notes)


def test_choose_attention_form_does_not_fire_without_decompressed_attention():
    gm = _prepared(_layer(V3_TINY), "decode", page_latent_attention)   # absorbed already
    graph_meta(gm).attention_form = None
    _no_fire(gm, choose_npu_attention_form)
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
    assert graph_meta(gm).attention_form == "absorbed"
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
    layer = _layer(V3_TINY, bf16)
    gm = _prepared(layer, "decode", absorb_kv_weights)
    _check(absorb_kv_weights, gm, layer, "decode", seed=3, expect_matches=1, expect_ops={"aten.bmm.default": 2})


@pytest.mark.parametrize("config, dtype, absorbed", [(V3_TINY, f32, ["decode", "prefill"]),
                                                     (V3_NPU, bf16, ["decode"])], ids=["v3", "v3npu-bf16"])
def test_absorb_kv_weights_per_part_of_a_mixed_batch(config, dtype, absorbed):
    """Each part of a split batch is absorbed or not by its own form (node meta, not the graph's)."""
    layer = _layer(config, dtype)
    gm = _prepared(layer, "mixed", absorb_kv_weights)
    _check(absorb_kv_weights, gm, layer, "mixed", seed=13, expect_matches=len(absorbed),
           expect_ops={"aten.bmm.default": 2 * len(absorbed), "mla.attention.default": 2})
    kv_b_parts = {n.meta["mla_batch_part"] for n in _nodes(gm, mla.attention.default) if _reads_kv_b(gm, n)}
    assert kv_b_parts == {"decode", "prefill"} - set(absorbed)


def _reads_kv_b(gm, attention) -> bool:
    """Whether kv_b_proj's weight reaches `attention` (its K/V are decompressed)."""
    return any(attention in _users_closure(u) for u in _kv_b_users(gm))


def test_absorb_kv_weights_does_not_fire_when_decompressed_won():
    layer = _layer(V3_TINY)
    gm = _prepared(layer, "decode", absorb_kv_weights)
    attention = next(n for n in gm.graph.nodes if n.target is mla.attention.default)
    attention.meta["mla_attention_form"] = graph_meta(gm).attention_form = "decompressed"
    record = _no_fire(gm, absorb_kv_weights).record
    assert any("'decompressed'" in note for note in record.notes)
    assert [u.target for u in _kv_b_users(gm)] == [aten.linear.default]
    npu = _layer(V3_NPU, bf16)
    prefill = _prepared(npu, "prefill", absorb_kv_weights)   # the cost model said decompressed, FIA TND admits it
    assert graph_meta(prefill).attention_form == "decompressed"
    _no_fire(prefill, absorb_kv_weights)


# ---- page_latent_attention ------------------------------------------------------------------

@pytest.mark.parametrize("config, dtype, phase, paged", [
    (V3_TINY, f32, "decode", 1), (V2_LITE_TINY, f32, "decode", 1),
    (V3_TINY, f32, "mixed", 2), (V2_LITE_TINY, f32, "mixed", 2),
    (V3_TINY, f32, "prefill", 1),          # absorbed now: FIA TND does not take the tiny dims
    (V3_NPU, bf16, "mixed", 1),            # the decode part; the prefill part stays decompressed
], ids=_id)
def test_page_latent_attention(config, dtype, phase, paged):
    layer = _layer(config, dtype)
    gm = _prepared(layer, phase, page_latent_attention)
    attentions = _n(gm, mla.attention.default)
    _count(gm, "mla.gather_paged.default", 2 * attentions)
    _check(page_latent_attention, gm, layer, phase, seed=4, expect_matches=paged,
           expect_ops={"mla.paged_attention.default": paged, "mla.attention.default": attentions - paged,
                       "mla.gather_paged.default": 2 * (attentions - paged)})


@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_page_latent_attention_does_not_fire_without_absorb(phase):
    gm = _capture(_layer(V3_TINY), phase)
    _no_fire(gm, page_latent_attention)
    _count(gm, "mla.paged_attention.default", 0)


# ---- fuse_kv_rmsnorm_rope_cache -------------------------------------------------------------

FUSED = "npu.npu_kv_rmsnorm_rope_cache_v2.default"


@pytest.mark.parametrize("config, dtype", [(V3_TINY, f32), (V2_LITE_TINY, f32), (V2_LITE_NPU, bf16)],
                         ids=["v3", "v2lite", "v2litenpu-bf16"])
@pytest.mark.parametrize("phase", ["decode", "prefill", "mixed"])
def test_fuse_kv_rmsnorm_rope_cache(config, dtype, phase):
    layer = _layer(config, dtype)
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
    assert any("of the match is also read by" in note for note in record.notes), record.notes   # the matcher's guard
    _count(gm, "mla.cache_write.default", 1)
    _count(gm, FUSED, 0)


def test_fuse_kv_rmsnorm_rope_cache_does_not_fire_after_rms_norm_was_lowered():
    gm = _prepared(_layer(V3_TINY), "decode", fuse_kv_rmsnorm_rope_cache)
    PassManager([lower_rms_norm]).run(gm)       # out of order: the cache write reads npu_rms_norm now
    _no_fire(gm, fuse_kv_rmsnorm_rope_cache)
    _count(gm, "mla.cache_write.default", 1)


# ---- lower_rope / lower_rms_norm ------------------------------------------------------------

ROPE_KERNEL, ROPE_ATEN = "q rope", "q rope (aten: no InterleaveRope for this dtype)"


@pytest.mark.parametrize("config, dtype, kernel", [
    (V3_TINY, f32, False), (V2_LITE_TINY, f32, False),       # GE's InterleaveRope takes no fp32
    (V3_TINY, bf16, True),                                    # the kernel's limit is the dtype only
    (V3_NPU, bf16, True), (V2_LITE_NPU, bf16, True),
], ids=_id)
@pytest.mark.parametrize("phase", ["decode", "mixed"])
def test_lower_rope(config, dtype, kernel, phase):
    layer = _layer(config, dtype)
    gm = _prepared(layer, phase, lower_rope)
    ropes = _n(gm, mla.rope.default)
    assert ropes == 1                  # the q rope (per token: not split); the k rope went into the fusion
    check = _check(lower_rope, gm, layer, phase, seed=6, expect_matches=ropes,
                   expect_ops={"npu.npu_interleave_rope.default": ropes if kernel else 0, "mla.rope.default": 0})
    assert check.record.matches_by_rule == {ROPE_KERNEL if kernel else ROPE_ATEN: ropes}
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

@pytest.mark.parametrize("config, phase, block, prefix", [
    (V3_NPU, "decode", 16, ""),
    (V2_LITE_NPU, "decode", 16, ""),
    (V2_LITE_NPU, "decode", 128, ""),
    (V3_NPU, "mixed", 16, "decode_"),     # the decode part; the prefill part is decompressed (FIA TND)
], ids=_id)
def test_lower_paged_attention(config, phase, block, prefix):
    layer = _layer(config, bf16)
    gm = _prepared(layer, phase, lower_paged_attention, block=block)
    inputs = list(graph_meta(gm).input_names)
    _check(lower_paged_attention, gm, layer, phase, seed=9, block=block, expect_matches=1,
           expect_ops={FIA: 1, "mla.paged_attention.default": 0})
    [fia] = _fias(gm)
    assert fia.kwargs["input_layout"] == "BNSD"
    assert fia.kwargs["sparse_mode"] == 0
    assert fia.kwargs["query_rope"] is not None and fia.kwargs["key_rope"] is not None   # MLA mode
    assert fia.kwargs["num_heads"] == layer.num_heads and fia.kwargs["num_key_value_heads"] == 1
    assert fia.kwargs["block_size"] == block
    assert fia.kwargs["block_table"].name == f"{prefix}block_table"
    assert fia.kwargs["actual_seq_lengths_kv"].name == f"{prefix}seq_lens_list"
    assert fia.kwargs.get("atten_mask") is None
    assert graph_meta(gm).input_names == inputs + [f"{prefix}seq_lens_list"]


@pytest.mark.parametrize("config, dtype, block, why", [
    (V3_TINY, f32, 16, "query.dtype=torch.float32"),
    (V2_LITE_TINY, bf16, 16, "query D=32"),
    (V3_NPU, f32, 16, "query.dtype=torch.float32"),
    (V2_LITE_NPU, bf16, 32, "block_size=32"),
], ids=["v3-fp32", "v2lite-bf16", "v3npu-fp32", "v2litenpu-block32"])
def test_lower_paged_attention_does_not_fire_outside_the_fia_limits(config, dtype, block, why):
    """Decode attention FIA MLA mode does not admit is left for the aten fallback, with a note."""
    gm = _prepared(_layer(config, dtype), "decode", lower_paged_attention, block=block)
    inputs = list(graph_meta(gm).input_names)
    record = _no_fire(gm, lower_paged_attention).record
    assert len(record.notes) == 1 and "not FIA" in record.notes[0] and why in record.notes[0]
    _count(gm, "mla.paged_attention.default", 1)
    assert graph_meta(gm).input_names == inputs


def test_lower_paged_attention_leaves_a_long_prefill_chunk_to_the_fallback():
    """fp16 keeps the prefill part absorbed (FIA TND is bf16 only): its latent attention has 40
    query tokens per request, over MLA mode's 16, so only the decode part becomes FIA (BNSD); no
    MLA-mode TND call is emitted."""
    layer = _layer(V2_LITE_NPU, f16)
    gm = _prepared(layer, "mixed", lower_paged_attention)
    _count(gm, "mla.paged_attention.default", 2)
    check = _check(lower_paged_attention, gm, layer, "mixed", seed=14, expect_matches=1,
                   expect_ops={FIA: 1, "mla.paged_attention.default": 1})
    [fia] = _fias(gm)
    assert fia.kwargs["input_layout"] == "BNSD" and fia.kwargs["block_table"].name == "decode_block_table"
    [left] = _nodes(gm, mla.paged_attention.default)
    assert left.args[4].name == "prefill_block_table"
    assert len(check.record.notes) == 1 and "query tokens per request" in check.record.notes[0]


def test_lower_paged_attention_does_not_fire_without_paged_attention():
    gm = _prepared(_layer(V2_LITE_NPU, bf16), "prefill", lower_paged_attention)   # decompressed: none paged
    inputs = list(graph_meta(gm).input_names)
    _no_fire(gm, lower_paged_attention)
    assert graph_meta(gm).input_names == inputs


# ---- lower_context_attention ----------------------------------------------------------------

@pytest.mark.parametrize("config, phase, prefix", [
    (V3_NPU, "prefill", ""), (V2_LITE_NPU, "prefill", ""), (V2_LITE_NPU, "mixed", "prefill_"),
], ids=_id)
def test_lower_context_attention(config, phase, prefix):
    layer = _layer(config, bf16)
    gm = _prepared(layer, phase, lower_context_attention)
    decompressed = [n for n in _nodes(gm, mla.attention.default) if n.meta["mla_attention_form"] == "decompressed"]
    assert len(decompressed) == 1
    inputs = list(graph_meta(gm).input_names)
    fias_before = len(_fias(gm))       # mixed: the decode part's BNSD FIA is there already
    _check(lower_context_attention, gm, layer, phase, seed=10, expect_matches=1,
           expect_ops={FIA: fias_before + 1, "mla.attention.default": 0, "mla.gather_paged.default": 0})
    [fia] = [n for n in _fias(gm) if n.kwargs["input_layout"] == "TND"]
    assert fia.kwargs["sparse_mode"] == 3 and fia.kwargs["atten_mask"] is not None
    assert "query_rope" not in fia.kwargs and "key_rope" not in fia.kwargs      # decompressed: no MLA mode
    assert fia.kwargs["num_heads"] == fia.kwargs["num_key_value_heads"] == layer.num_heads
    assert fia.kwargs["actual_seq_lengths"].name == f"{prefix}query_ends_list"
    assert fia.kwargs["actual_seq_lengths_kv"].name == f"{prefix}context_ends_list"
    added = graph_meta(gm).input_names[len(inputs):]
    assert graph_meta(gm).input_names[: len(inputs)] == inputs
    assert sorted(added) == [f"{prefix}{name}" for name in ("context_ends_list", "context_slots", "query_ends_list")]


@pytest.mark.parametrize("config, dtype, phase", [(V3_TINY, f32, "decode"), (V3_TINY, f32, "prefill"),
                                                  (V2_LITE_NPU, bf16, "decode")],
                         ids=["v3-decode", "v3-prefill", "v2litenpu-decode"])
def test_lower_context_attention_does_not_fire_on_absorbed_attention(config, dtype, phase):
    gm = _prepared(_layer(config, dtype), phase, lower_context_attention)
    assert graph_meta(gm).attention_form == "absorbed"
    inputs = list(graph_meta(gm).input_names)
    _no_fire(gm, lower_context_attention)
    assert graph_meta(gm).input_names == inputs


def test_lower_context_attention_refuses_decompressed_attention_fia_tnd_cannot_take():
    """With the cost model alone (no admission check) the tiny prefill stays decompressed; the
    lowering names the limit instead of emitting a TND call the kernel would reject."""
    pipeline = [choose_attention_form if p is choose_npu_attention_form else p for p in target_pipeline("npu", "prefill")]
    gm = _prepared(_layer(V3_TINY), "prefill", lower_context_attention, pipeline=pipeline)
    assert graph_meta(gm).attention_form == "decompressed"
    with pytest.raises(ValueError, match="FIA TND kernel cannot take.*query.dtype=torch.float32"):
        PassManager([lower_context_attention]).run(gm)


# ---- lower_paged_attention_to_aten ----------------------------------------------------------

@pytest.mark.parametrize("config, dtype, phase, matches", [
    (V3_TINY, f32, "decode", 1),       # one token per request: the block table rows as they are
    (V2_LITE_TINY, f32, "prefill", 1),  # several tokens per request: rows picked per token
    (V3_TINY, f32, "mixed", 2),        # both parts
    (V3_TINY, bf16, "mixed", 2),
    (V2_LITE_NPU, f16, "mixed", 1),    # the long prefill chunk FIA MLA mode does not take
], ids=_id)
def test_lower_paged_attention_to_aten(config, dtype, phase, matches):
    layer = _layer(config, dtype)
    gm = _prepared(layer, phase, lower_paged_attention_to_aten)
    _count(gm, "mla.paged_attention.default", matches)
    fias = len(_fias(gm))
    softmaxes = _n(gm, aten._softmax.default)
    check = _check(lower_paged_attention_to_aten, gm, layer, phase, seed=15, expect_matches=matches,
                   expect_ops={"mla.paged_attention.default": 0, FIA: fias,
                               "aten._softmax.default": softmaxes + matches})
    assert check.record.matches_by_rule == {FALLBACK_RULE: matches}
    _no_fire(gm, lower_paged_attention_to_aten)


@pytest.mark.parametrize("phase", ["decode", "mixed"])
def test_lower_paged_attention_to_aten_ignores_nan_outside_each_context(phase):
    """Slots no token may see (other requests' blocks, the padding block, the tail of a request's
    last block) hold NaN: the output is still finite and equals the graph before the pass."""
    layer = _layer(V3_TINY)
    gm = _prepared(layer, phase, lower_paged_attention_to_aten)
    make = _batch_inputs(layer, phase, seed=16, nan_outside_context=True)
    latent = make(gm)[list(graph_meta(gm).input_names).index("latent_cache")]
    assert latent.isnan().any() and not latent.isnan().all()
    check = check_pass(lower_paged_attention_to_aten, gm, make_inputs=make, tolerances=TOL,
                       expect_matches=_n(gm, mla.paged_attention.default))
    out = check.after(*make(check.after))
    assert torch.isfinite(out).all()


def test_lower_paged_attention_to_aten_does_not_fire_after_fia_took_every_attention():
    gm = _prepared(_layer(V3_NPU, bf16), "decode", lower_paged_attention_to_aten)
    assert len(_fias(gm)) == 1
    _no_fire(gm, lower_paged_attention_to_aten)


def test_lowered_graph_can_be_deep_copied():
    """No pass leaves graph Nodes in gm.meta (a deep copy of the module must still work)."""
    layer = _layer(V3_TINY, torch.float32)
    gm = _capture(layer, "mixed")
    PassManager(target_pipeline("npu", "mixed")).run(gm)
    clone = copy.deepcopy(gm)
    assert clone.code == gm.code

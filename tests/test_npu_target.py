"""Target "npu": equals the reference target through the emulated torch_npu kernels.

The tiny configs fit none of the kernels' documented limits (mla_graph/npu/limits.py): their
lowering takes the aten fallbacks, and the tests below hold them to that. V3_NPU / V2_LITE_NPU in
bf16 are admitted: FIA in MLA mode (BNSD) for decode, FIA TND for decompressed prefill.
"""
import math

import pytest
import torch
from conftest import TOL, V2_LITE_NPU, V2_LITE_TINY, V3_NPU, V3_TINY, randomize

from mla_graph import MLAAttention, MLAConfig, PagedLatentCache, build_metadata, lower, positions_for
from mla_graph.cache import PADDING_BLOCK
from mla_graph.checking import LAYER_TOLERANCES, PHASE_BATCHES, compare_with_plain, random_batch
from mla_graph.npu import EMULATED_SCHEMAS, npu_backend
from mla_graph.targets import pipeline as target_pipeline
from mla_graph.passes import PassManager, PassResult, PassVerificationError
from mla_graph.passes.page import page_latent_attention

f32, bf16 = torch.float32, torch.bfloat16
FIA = "npu.npu_fused_infer_attention_score.default"
# requests of a mixed batch whose prefill chunks (40 tokens) exceed FIA MLA mode's 16 per request
LONG_MIXED = [(1, 19), (1, 3), (40, 0), (40, 12)]


def _layer(config: MLAConfig, dtype: torch.dtype, **kw) -> MLAAttention:
    # the NPU-sized configs at std 0.02: at 0.2 their logits are huge and bf16 noise dominates
    std = 0.02 if config in (V3_NPU, V2_LITE_NPU) else 0.2
    return randomize(MLAAttention(config, dtype=dtype, **kw), std=std)


def _ops(gm) -> dict[str, int]:
    ops: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function":
            ops[str(node.target)] = ops.get(str(node.target), 0) + 1
    return ops


def _fias(gm) -> list:
    return [n for n in gm.graph.nodes if n.target is torch.ops.npu.npu_fused_infer_attention_score.default]


def _matches(lowered, phase: str) -> dict[str, int]:
    return {r.name: r.matches for r in lowered.reports[phase].records}


def _ulp(magnitude: float, dtype: torch.dtype) -> float:
    """The spacing of `dtype` values at `magnitude`."""
    return 2.0 ** math.floor(math.log2(magnitude)) * torch.finfo(dtype).eps


def _assert_output_agrees(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """The layer tolerance of the dtype, with atol at least 3 ulps of the output's largest value:
    o_proj sums the heads' outputs, so a small output carries the rounding of its large terms. In
    bf16 the plain layer and the lowered one are each up to ~2 ulps (of that magnitude) from an
    fp64 run of the same weights (measured on the tiny configs at std 0.2), in either direction."""
    rtol, atol = LAYER_TOLERANCES[dtype]
    atol = max(atol, 3 * _ulp(expected.float().abs().max().item(), dtype))
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [f32, bf16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("phase", ["prefill", "decode", "mixed"])
def test_tiny_npu_equals_plain_through_the_fallbacks(config, dtype, phase):
    """No FIA admits the tiny dims: every latent attention runs as aten ops (prefill absorbed, a
    mixed batch split in two), the q rope in aten ops for fp32; the layer's numbers are unchanged."""
    layer = _layer(config, dtype)
    npu = lower(layer, "npu", [phase], block_size=16)
    gm = npu.graph_for(phase)
    ops = _ops(gm)
    assert FIA not in ops and not [op for op in ops if op.startswith("mla.")]
    attentions = 2 if phase == "mixed" else 1
    matches = _matches(npu, phase)
    assert matches["lower_paged_attention_to_aten"] == attentions
    assert matches["lower_paged_attention"] == matches["lower_context_attention"] == 0
    assert matches["split_mixed_batch"] == (phase == "mixed")
    assert ops.get("npu.npu_interleave_rope.default", 0) == (dtype == bf16)
    assert ops.get("npu.npu_kv_rmsnorm_rope_cache_v2.default") == 1   # the cache writer has no such limits
    batch = random_batch(layer, PHASE_BATCHES[phase], block_size=16, seed=7)
    ref_cache, npu_cache = batch.cache.clone(), batch.cache.clone()
    with torch.no_grad():
        expected = layer(batch.hidden_states, batch.positions, ref_cache, batch.metadata)
        actual = npu(batch.hidden_states, batch.positions, npu_cache, batch.metadata)
    _assert_output_agrees(actual, expected, dtype)
    rtol, atol = LAYER_TOLERANCES[dtype]
    owned = [b for b in range(batch.cache.num_blocks) if b != PADDING_BLOCK]
    for part in ("latent", "rope"):
        torch.testing.assert_close(getattr(npu_cache, part)[owned], getattr(ref_cache, part)[owned],
                                   rtol=rtol, atol=atol)


@pytest.mark.parametrize("config", [V3_NPU, V2_LITE_NPU], ids=["v3npu", "v2litenpu"])
@pytest.mark.parametrize("phase", ["prefill", "decode", "mixed"])
def test_npu_configs_equal_plain_through_fia(config, phase):
    layer = _layer(config, bf16)
    npu = lower(layer, "npu", [phase], block_size=16)
    layouts = sorted(n.kwargs["input_layout"] for n in _fias(npu.graph_for(phase)))
    assert layouts == {"decode": ["BNSD"], "prefill": ["TND"], "mixed": ["BNSD", "TND"]}[phase]
    assert _matches(npu, phase)["lower_paged_attention_to_aten"] == 0
    result = compare_with_plain(layer, npu, phase, seed=7)
    assert result.ok, result


@pytest.mark.parametrize("config", [V3_NPU, V2_LITE_NPU], ids=["v3npu", "v2litenpu"])
def test_mixed_batch_is_split_into_fia_bnsd_and_fia_tnd(config):
    """The decode part: FIA MLA mode, BNSD, over the decode requests' block table; the prefill part:
    decompressed FIA TND, sparse mode 3. No MLA-mode call in TND (it admits <= 16 query tokens per
    request, and a prefill chunk can have more), nothing left for the aten fallback."""
    layer = _layer(config, bf16)
    gm = lower(layer, "npu", ["mixed"], block_size=16).graph_for("mixed")
    fias = _fias(gm)
    assert len(fias) == 2
    [bnsd] = [f for f in fias if f.kwargs["input_layout"] == "BNSD"]
    [tnd] = [f for f in fias if f.kwargs["input_layout"] == "TND"]
    assert bnsd.kwargs["query_rope"] is not None and bnsd.kwargs["num_key_value_heads"] == 1
    assert bnsd.kwargs["block_table"].name == "decode_block_table"
    assert bnsd.kwargs["actual_seq_lengths_kv"].name == "decode_seq_lens_list"
    assert tnd.kwargs["sparse_mode"] == 3 and tnd.kwargs["atten_mask"] is not None
    assert tnd.kwargs.get("query_rope") is None and tnd.kwargs.get("key_rope") is None
    assert tnd.kwargs["num_key_value_heads"] == tnd.kwargs["num_heads"] == layer.num_heads
    assert tnd.kwargs["actual_seq_lengths"].name == "prefill_query_ends_list"
    assert not [f for f in fias if f.kwargs["input_layout"] == "TND" and f.kwargs.get("query_rope") is not None]
    assert "aten._softmax.default" not in _ops(gm)      # no attention in aten ops


@pytest.mark.parametrize("config, dtype", [(V3_NPU, bf16), (V3_TINY, f32)], ids=["v3npu-bf16", "v3-fp32"])
def test_mixed_batch_with_long_prefill_chunks(config, dtype):
    """A mixed batch with 40-token prefill chunks: the npu target equals the plain layer and the
    reference target; caches written in the new tokens' slots agree, every other slot keeps its
    random pre-fill bit for bit (the padding block aside: graph-mode decode may write there)."""
    layer = _layer(config, dtype)
    npu = lower(layer, "npu", ["mixed"], block_size=16)
    ref = lower(layer, "reference", ["mixed"], block_size=16)
    batch = random_batch(layer, LONG_MIXED, block_size=16, seed=11)   # random cache contents
    assert batch.metadata.phase == "mixed"
    caches = {name: batch.cache.clone() for name in ("plain", "ref", "npu")}
    with torch.no_grad():
        expected = layer(batch.hidden_states, batch.positions, caches["plain"], batch.metadata)
        outs = {name: module(batch.hidden_states, batch.positions, caches[name], batch.metadata)
                for name, module in (("ref", ref), ("npu", npu))}
    _assert_output_agrees(outs["npu"], expected, dtype)
    _assert_output_agrees(outs["npu"], outs["ref"], dtype)
    rtol, atol = TOL[dtype]
    written = torch.zeros(batch.cache.num_blocks * 16, dtype=torch.bool)
    written[batch.metadata.slot_mapping.long()] = True
    owned = torch.ones(batch.cache.num_blocks, 16, dtype=torch.bool)
    owned[PADDING_BLOCK] = False
    kept = ~written & owned.view(-1)
    for part in ("latent", "rope"):
        slots = {name: getattr(cache, part).view(written.shape[0], -1)
                 for name, cache in {**caches, "before": batch.cache}.items()}
        for name in ("plain", "ref"):
            torch.testing.assert_close(slots["npu"][written], slots[name][written], rtol=rtol, atol=atol)
        assert torch.equal(slots["npu"][kept], slots["before"][kept]), f"npu wrote {part} slots of no new token"


@pytest.mark.parametrize("requests", [[(9, 0), (20, 3)], [(1, 5), (1, 30)]], ids=["prefill-only", "decode-only"])
def test_mixed_graph_serves_a_batch_with_an_empty_part(requests):
    """LoweredMLA runs the mixed graph for every batch when only "mixed" was lowered: one part of
    the split batch is then empty, and FIA takes an empty query as the op docs say (returns at once)."""
    layer = _layer(V2_LITE_NPU, bf16)
    npu = lower(layer, "npu", ["mixed"], block_size=16)
    batch = random_batch(layer, requests, block_size=16, seed=2)
    with torch.no_grad():
        expected = layer(batch.hidden_states, batch.positions, batch.cache.clone(), batch.metadata)
        actual = npu(batch.hidden_states, batch.positions, batch.cache.clone(), batch.metadata)
    _assert_output_agrees(actual, expected, bf16)


@pytest.mark.parametrize("config, dtype", [(V3_TINY, f32), (V3_TINY, bf16), (V2_LITE_TINY, f32),
                                           (V2_LITE_TINY, bf16), (V2_LITE_NPU, bf16)],
                         ids=["v3-fp32", "v3-bf16", "v2lite-fp32", "v2lite-bf16", "v2litenpu-bf16"])
def test_several_decode_steps_and_cache_contents(config, dtype):
    """Prefill then 5 decode steps: npu and reference agree on every output and, after the last
    step, on the whole contents of both caches."""
    block_size = 16
    layer = _layer(config, dtype)
    ref = lower(layer, "reference", block_size=block_size)
    npu = lower(layer, "npu", block_size=block_size)
    fia = config is V2_LITE_NPU     # FIA BNSD for the decode steps, FIA TND for the prefill
    assert [len(_fias(npu.graph_for(p))) for p in ("prefill", "decode")] == ([1, 1] if fia else [0, 0])
    caches = {name: PagedLatentCache.allocate(config, 24, block_size, dtype=dtype, shuffle_blocks=True, seed=1)
              for name in ("ref", "npu")}
    rows = [[], [], []]
    prompts = [3, 18, 30]
    gen = torch.Generator().manual_seed(3)
    rtol, atol = TOL[dtype]
    for step in range(6):
        requests = [(p, 0) for p in prompts] if step == 0 else [(1, p + step - 1) for p in prompts]
        for row, (n, c) in zip(rows, requests):
            caches["ref"].allocator.grow(row, n + c, block_size)
        md = build_metadata(requests, rows, block_size)
        x = torch.randn(md.num_tokens, config.hidden_size, generator=gen).to(dtype)
        pos = positions_for(requests)
        out_ref = ref(x, pos, caches["ref"], md)
        out_npu = npu(x, pos, caches["npu"], md)
        # twice the layer tolerance: npu_rms_norm / the fused cache writer round after the gamma
        # multiply, the reference before it, so cached rows may differ by a bf16 ulp and the
        # difference carries through later steps (2 ulps at outputs of magnitude 4-8 is 0.0625)
        torch.testing.assert_close(out_npu, out_ref, rtol=rtol, atol=atol * 2)
    for part in ("latent", "rope"):
        torch.testing.assert_close(getattr(caches["npu"], part), getattr(caches["ref"], part), rtol=rtol, atol=atol)


def test_decode_graph_is_fully_lowered_with_folded_weights():
    layer = _layer(V3_NPU, bf16)
    gm = lower(layer, "npu", ["decode"], block_size=16).graph_for("decode")
    ops = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert not [op for op in ops if op.startswith("mla.")]
    assert {FIA, "npu.npu_kv_rmsnorm_rope_cache_v2.default",
            "npu.npu_interleave_rope.default", "npu.npu_rms_norm.default"} <= ops
    # no per-call weight transform: kv_b_proj's weight is not read at all (its absorbed halves are
    # constants folded at lowering), and every bmm reads a constant as its second operand
    readers = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == "kv_b_proj.weight"]
    assert readers == [] or all(not r.users for r in readers)
    for node in gm.graph.nodes:
        if node.target is torch.ops.aten.bmm.default:
            assert node.args[1].op == "get_attr"
    [fia] = _fias(gm)
    assert fia.kwargs["input_layout"] == "BNSD" and fia.kwargs["num_key_value_heads"] == 1
    assert fia.kwargs["block_size"] == 16 and fia.kwargs["query_rope"] is not None


def test_verifier_checks_emitted_vendor_ops_against_their_schema():
    layer = MLAAttention(V3_NPU, dtype=bf16)
    gm = lower(layer, "npu", ["decode"], block_size=16).graph_for("decode")

    def bad_layout(gm):
        fia = next(n for n in gm.graph.nodes if n.target is torch.ops.npu.npu_fused_infer_attention_score.default)
        fia.kwargs = {**fia.kwargs, "input_layout": "BSXD"}
        return PassResult(changed=True, matches=1)

    with pytest.raises(PassVerificationError, match="'bad_layout'.*input_layout"):
        PassManager([bad_layout]).run(gm)

    def unknown_kwarg(gm):
        node = next(n for n in gm.graph.nodes if n.target is torch.ops.npu.npu_rms_norm.default)
        node.kwargs = {"eps": 1e-6}
        return PassResult(changed=True)

    fresh = lower(layer, "npu", ["decode"], block_size=16).graph_for("decode")
    with pytest.raises(PassVerificationError, match="'unknown_kwarg'.*npu.npu_rms_norm.default fails"):
        PassManager([unknown_kwarg]).run(fresh)


@pytest.mark.parametrize("config, dtype, kernels", [
    (V3_TINY, f32, {"npu.npu_kv_rmsnorm_rope_cache_v2.default", "npu.npu_rms_norm.default"}),
    (V3_NPU, bf16, {FIA, "npu.npu_interleave_rope.default", "npu.npu_kv_rmsnorm_rope_cache_v2.default",
                    "npu.npu_rms_norm.default"}),
], ids=["v3-fp32", "v3npu-bf16"])
def test_emitted_ops_use_the_torch_npu_schemas(config, dtype, kernels):
    lowered = lower(MLAAttention(config, dtype=dtype), "npu", block_size=16)
    checked = set()
    for gm in lowered.graphs.values():
        for node in gm.graph.nodes:
            name = str(node.target) if node.op == "call_function" else ""
            if name.startswith(("npu.", "atb.")):
                ns, op = name.split(".")[:2]
                assert f"{ns}::{op}" in EMULATED_SCHEMAS
                if npu_backend() == "emulated":
                    assert str(node.target._schema).startswith(f"{ns}::{op}(")
                checked.add(name)
    assert checked == kernels


@pytest.mark.parametrize("config, dtype, fia", [(V3_TINY, "fp32", False), (V2_LITE_NPU, "bf16", True)],
                         ids=["v3-fp32", "v2litenpu-bf16"])
def test_cli_lower_npu(capsys, config, dtype, fia):
    from mla_graph.cli import main
    import json, tempfile, pathlib
    with tempfile.TemporaryDirectory() as tmp:
        cfg = pathlib.Path(tmp) / "config.json"
        cfg.write_text(json.dumps(config.to_hf()))
        assert main(["lower", "--hf-config", str(cfg), "--target", "npu", "--block-size", "16",
                     "--dtype", dtype, "--dump", str(pathlib.Path(tmp) / "d"), "--verify"]) == 0
        out = capsys.readouterr().out
        assert "absorb_kv_weights" in out and "split_mixed_batch" in out
        assert (FIA in out) == fia
        assert "MISMATCH" not in out
        page = target_pipeline("npu", "decode").index(page_latent_attention) + 1
        assert (pathlib.Path(tmp) / "d" / "decode" / f"{page:02d}-page_latent_attention.after.txt").exists()
        aten_dumps = list((pathlib.Path(tmp) / "d").glob("*/*-lower_paged_attention_to_aten.after.txt"))
        assert bool(aten_dumps) == (not fia)     # the fallback changed a graph only where FIA did not fit

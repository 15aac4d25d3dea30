"""Target "torchair": static-bucket decode graphs, equal to the reference target, within budget."""
import pytest
import torch
from conftest import TOL, V2_LITE_NPU, V2_LITE_TINY, V3_NPU, V3_TINY, changed_rows, randomize

from mla_graph import MLAAttention, MLAConfig, PagedLatentCache, build_metadata, lower, positions_for
from mla_graph.cache import PADDING_BLOCK
from mla_graph.kernels import device_kernels

BS = 16
# (config, dtype): V3_NPU bf16 takes the fused prolog and FIA; V2_LITE_NPU bf16 the functional cache
# writer, interleave rope and FIA; the tiny configs and fp32 fit none of the kernels' documented
# limits and take the fallbacks (aten attention, and for fp32 aten rope)
CASES = [(V3_NPU, torch.bfloat16), (V3_TINY, torch.float32), (V2_LITE_NPU, torch.bfloat16),
         (V2_LITE_TINY, torch.bfloat16)]


def _layer(config, dtype):
    return randomize(MLAAttention(config, dtype=dtype), std=0.02 if config in (V3_NPU, V2_LITE_NPU) else 0.2)


def _run_steps(layer, lowered_a, lowered_b, dtype, batch_plan):
    """A prefill of 5 requests, then decode steps with the given numbers of live requests. Both
    caches start from the same random contents, so a stray write shows: after every step, the
    slots whose bytes changed must be that step's tokens' slots (or in the padding block)."""
    config = layer.config
    caches = [PagedLatentCache.allocate(config, 48, BS, dtype=dtype, shuffle_blocks=True, seed=2) for _ in range(2)]
    gen = torch.Generator().manual_seed(9)
    for part in ("latent", "rope"):
        start = torch.randn(getattr(caches[0], part).shape, generator=gen).to(dtype)
        for cache in caches:
            getattr(cache, part).copy_(start)
    prompts = [3, 17, 9, 30, 5]
    rows = [[] for _ in prompts]
    gen = torch.Generator().manual_seed(5)
    padding_slots = set(range(PADDING_BLOCK * BS, (PADDING_BLOCK + 1) * BS))
    outputs = []
    for step, live in enumerate(batch_plan):
        requests = [(p, 0) for p in prompts] if step == 0 else [(1, prompts[i] + step - 1) for i in range(live)]
        for row, (n, c) in zip(rows, requests):
            caches[0].allocator.grow(row, n + c, BS)
        md = build_metadata(requests, rows[: len(requests)], BS)
        x = torch.randn(md.num_tokens, config.hidden_size, generator=gen).to(dtype)
        pos = positions_for(requests)
        before = [cache.clone() for cache in caches]
        outputs.append((lowered_a(x, pos, caches[0], md), lowered_b(x, pos, caches[1], md)))
        for name, old, new in zip(("reference", "graph"), before, caches):
            for part in ("latent", "rope"):
                changed = set(changed_rows(getattr(old, part), getattr(new, part)))
                stray = sorted(changed - set(md.slot_mapping.tolist()) - padding_slots)
                assert not stray, (f"step {step} ({live} requests): {name} wrote {part} slots {stray}, "
                                   f"which no token of the step owns")
    return outputs, caches


@pytest.mark.parametrize("config, dtype", CASES)
@pytest.mark.parametrize("target", ["torchair", "torchair-multistream"])
def test_torchair_decode_equals_reference_across_buckets(config, dtype, target):
    layer = _layer(config, dtype)
    ref = lower(layer, "reference", block_size=BS)
    graph = lower(layer, target, block_size=BS, target_options={"graph_batch_sizes": [2, 4, 8]})
    plan = [5, 5, 3, 3, 5, 2, 1, 4]          # 5 and 3 need padding (to 8 and 4)
    outputs, caches = _run_steps(layer, ref, graph, dtype, plan)
    rtol, atol = TOL[dtype]
    for expected, actual in outputs:
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
    owned = [b for b in range(caches[0].num_blocks) if b != PADDING_BLOCK]
    for part in ("latent", "rope"):
        # padded rows write only into the padding block, which no request owns or reads
        torch.testing.assert_close(getattr(caches[1], part)[owned], getattr(caches[0], part)[owned],
                                   rtol=rtol, atol=atol)
    runner = graph.runners["decode"]
    # step 0 is the prefill (eager); decodes of 5, 3, 3, 5, 2, 1, 4 requests ran in buckets
    # 8, 4, 4, 8, 2, 2, 4: three graphs, none compiled twice
    assert runner.buckets_run == [8, 4, 4, 8, 2, 2, 4]
    assert len(runner.backend.graphs) == 3
    for compiled in runner.backend.graphs:   # static shapes: every placeholder size is a plain int
        for node in compiled.graph.nodes:
            if node.op == "placeholder" and isinstance(node.meta.get("example_value"), torch.Tensor):
                assert all(isinstance(s, int) for s in node.meta["example_value"].shape)


@pytest.mark.parametrize("config, tp_size", [(MLAConfig.preset("deepseek-v3"), 8), (V3_NPU, 1)],
                         ids=["deepseek-v3-tp8", "v3-npu"])
def test_v3_decode_layer_is_four_kernels(config, tp_size):
    layer = MLAAttention(config, dtype=torch.bfloat16, tp_size=tp_size).requires_grad_(False)
    gm = lower(layer, "torchair", ["decode"], block_size=128).graph_for("decode")
    assert device_kernels(gm) == ["npu.npu_mla_prolog_v3_functional.default",
                                  "air.npu_fused_infer_attention_score.default",
                                  "aten.bmm.default", "aten.mm.default"]
    ops = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert not any(op.startswith(("mla.", "atb.")) or "index_put" in op for op in ops)


@pytest.mark.parametrize("config, dtype, why", [(V2_LITE_NPU, torch.bfloat16, "q_lora"),
                                                (V3_NPU, torch.float32, "bfloat16")], ids=["no-q-lora", "fp32"])
def test_prolog_fallback_without_q_lora_or_bf16(config, dtype, why):
    lowered = lower(MLAAttention(config, dtype=dtype), "torchair", ["decode"], block_size=BS)
    kernels = device_kernels(lowered.graph_for("decode"))
    assert "npu.npu_kv_rmsnorm_rope_cache.default" in kernels
    # GE's InterleaveRope takes no fp32: an fp32 model's q rope is aten ops
    assert ("npu.npu_interleave_rope.default" in kernels) == (dtype is torch.bfloat16)
    assert not any("mla_prolog" in k for k in kernels)
    notes = next(r for r in lowered.reports["decode"].records if r.name == "fuse_mla_prolog").notes
    assert notes and why in notes[0], notes


def test_multistream_scopes_pair_and_hold_the_kv_branch():
    layer = MLAAttention(V2_LITE_NPU, dtype=torch.bfloat16)
    gm = lower(layer, "torchair-multistream", ["decode"], block_size=BS).graph_for("decode")
    nodes = list(gm.graph.nodes)
    enters = [i for i, n in enumerate(nodes) if n.target is torch.ops.air.scope_enter.default]
    exits = [i for i, n in enumerate(nodes) if n.target is torch.ops.air.scope_exit.default]
    assert len(enters) == len(exits) == 1 and enters[0] < exits[0]
    inside = [str(n.target) for n in nodes[enters[0] + 1: exits[0]] if n.op == "call_function"]
    assert "npu.npu_kv_rmsnorm_rope_cache.default" in inside
    assert not any("interleave_rope" in op or "fused_infer" in op for op in inside)
    fia = next(n for n in nodes if n.target is torch.ops.air.npu_fused_infer_attention_score.default)
    assert fia.args[0].target is torch.ops.air.wait_tensor.default
    # the fused prolog leaves one producer chain: nothing to overlap, no scopes
    v3 = lower(MLAAttention(V3_NPU, dtype=torch.bfloat16), "torchair-multistream", ["decode"], block_size=BS)
    assert not any(str(n.target).startswith("air.scope") for n in v3.graph_for("decode").graph.nodes)


def test_bad_options_and_oversized_batches():
    layer = MLAAttention(V3_TINY, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="unknown target option\\(s\\) \\['buckets'\\] for target 'torchair'; valid: graph_batch_sizes"):
        lower(layer, "torchair", ["decode"], block_size=BS, target_options={"buckets": [1]})
    with pytest.raises(ValueError, match="graph_batch_sizes must be a non-empty list of positive ints"):
        lower(layer, "torchair", ["decode"], block_size=BS, target_options={"graph_batch_sizes": [0]})
    # torchair's air FIA runs only in GE graph mode (its kernel raises under reduce-overhead)
    with pytest.raises(ValueError, match="mode must be 'max-autotune', got 'reduce-overhead'.*only in GE graph mode"):
        lower(layer, "torchair", ["decode"], block_size=BS, target_options={"mode": "reduce-overhead"})
    graph = lower(layer, "torchair", ["decode"], block_size=BS, target_options={"graph_batch_sizes": [2]})
    cache = PagedLatentCache.allocate(V3_TINY, 8, BS, dtype=torch.bfloat16)
    requests = [(1, 3)] * 3
    md = build_metadata(requests, [cache.allocator.grow([], 4, BS) for _ in requests], BS)
    with pytest.raises(ValueError, match="decode batch of 3 requests exceeds the largest graph batch size 2"):
        graph(torch.randn(3, V3_TINY.hidden_size).bfloat16(), positions_for(requests), cache, md)


@pytest.mark.parametrize("config, dtype", [(V3_NPU, torch.bfloat16), (V2_LITE_TINY, torch.float32)])
def test_bucket_graphs_pass_the_torchair_check(config, dtype):
    """What the compiler is handed for each bucket (an AOT-traced, static-shape aten graph) has
    only ops with real GE converters, no index_put or atb::, paired scopes, static sizes."""
    from mla_graph.torchair_compat import check_torchair

    layer = MLAAttention(config, dtype=dtype)
    for target in ("torchair", "torchair-multistream"):
        graph = lower(layer, target, ["decode"], block_size=BS, target_options={"graph_batch_sizes": [1, 4]})
        cache = PagedLatentCache.allocate(config, 4, BS, dtype=dtype)
        gen = torch.Generator().manual_seed(3)
        for part in (cache.latent, cache.rope):
            part.copy_(torch.randn(part.shape, generator=gen).to(dtype))
        before = cache.clone()
        compiled = graph.runners["decode"].warmup(cache, layer.cos_sin)
        assert len(compiled) == 2
        # the dummy batch is all padding: its 4 rows write rows 0-3 of the padding block, nothing else
        padding_rows = [PADDING_BLOCK * BS + i for i in range(4)]
        for part in ("latent", "rope"):
            changed = changed_rows(getattr(before, part), getattr(cache, part))
            assert changed == padding_rows, f"{target} warm-up changed {part} slots {changed}, expected {padding_rows}"
        for gm in compiled:
            report = check_torchair(gm, static_dims=True, toolchain=False)
            assert report.ok, report.table()
            ops = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
            # FIA where its documented limits admit the call; the tiny fp32 config takes aten attention
            assert ("air.npu_fused_infer_attention_score.default" in ops) == (config is V3_NPU)


def test_padded_rows_and_empty_slots_write_only_the_padding_block():
    """A batch of 3 in a bucket of 4, one request with slot -1 (write nothing): the fused prolog's
    cache_index must be a slot in range, so both go to the padding block; every other byte of the
    caches (pre-filled with NaN) is untouched but the two written slots."""
    layer = _layer(V3_NPU, torch.bfloat16)
    graph = lower(layer, "torchair", ["decode"], block_size=BS, target_options={"graph_batch_sizes": [4]})
    cache = PagedLatentCache.allocate(V3_NPU, 8, BS, dtype=torch.bfloat16)
    requests = [(1, 3), (1, 20), (1, 7)]
    rows = [cache.allocator.grow([], n + c, BS) for n, c in requests]
    md = build_metadata(requests, rows, BS)
    md.slot_mapping[1] = -1
    cache.latent.fill_(float("nan"))
    cache.rope.fill_(float("nan"))
    before = cache.clone()
    graph(torch.randn(3, V3_NPU.hidden_size).bfloat16(), positions_for(requests), cache, md)
    written = sorted(int(s) for s in md.slot_mapping if s >= 0)
    # the padded row and the -1 request's row go to two distinct rows of the padding block
    expected = sorted(written + [PADDING_BLOCK * BS + 1, PADDING_BLOCK * BS + 3])
    for part in ("latent", "rope"):
        changed = changed_rows(getattr(before, part), getattr(cache, part))
        assert changed == expected, f"{part} slots {changed} changed, expected {expected}"
        assert not getattr(cache, part).view(-1, getattr(cache, part).shape[-1])[expected].isnan().any()

"""Each rank holds num_heads / tp_size heads; the ranks' partial outputs add up to the full layer."""
import dataclasses

import pytest
import torch
from conftest import TOL, V2_LITE_NPU, V2_LITE_TINY, V3_NPU, V3_TINY, randomize
from hf_oracle import hf_attention, hf_prefill

from mla_graph.contract import graph_meta
from mla_graph import MLAAttention, PagedLatentCache, build_metadata, capture, lower, positions_for
from mla_graph.attention import shard_state_dict


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_rank_outputs_sum_to_hugging_face(config, tp_size):
    hf, rotary = hf_attention(config, torch.float32)
    randomize(hf)
    x = torch.randn(11, config.hidden_size)
    with torch.no_grad():
        expected = hf_prefill(hf, rotary, x)
    requests = [(11, 0)]
    total = torch.zeros_like(expected)
    for rank in range(tp_size):
        layer = MLAAttention(config, tp_size=tp_size, tp_rank=rank).requires_grad_(False)
        layer.load_state_dict(shard_state_dict(hf.state_dict(), config, tp_size, rank))
        assert layer.num_heads == config.num_heads // tp_size
        lowered = lower(layer, phases=["prefill"], block_size=16)
        gm = lowered.graph_for("prefill")
        assert graph_meta(gm).num_heads == config.num_heads // tp_size
        cache = PagedLatentCache.allocate(config, 4, 16)
        md = build_metadata(requests, [cache.allocator.grow([], 11, 16)], 16)
        total += lowered(x, positions_for(requests), cache, md)
    rtol, atol = TOL[torch.float32]
    torch.testing.assert_close(total, expected, rtol=rtol * 10, atol=atol * 10)


def test_capture_shapes_follow_heads_per_rank():
    layer = MLAAttention(V3_TINY, tp_size=2, tp_rank=1)
    gm = capture(layer, "decode", block_size=16)
    attention = next(n for n in gm.graph.nodes if n.target is torch.ops.mla.attention.default)
    assert attention.meta["val"].shape[1] == V3_TINY.num_heads // 2


def test_bad_tp_arguments():
    with pytest.raises(ValueError, match="num_heads=4 is not divisible by tp_size=3"):
        MLAAttention(V3_TINY, tp_size=3)
    with pytest.raises(ValueError, match="tp_rank must be in \\[0, tp_size=2\\), got 2"):
        MLAAttention(V3_TINY, tp_size=2, tp_rank=2)


# V2_LITE_NPU with 16 heads: 8 per rank at tp 2, which FIA TND admits (8..128), so the prefill stays
# decompressed; V3_NPU's 8 heads give 4 per rank (FIA MLA's 32/64/128 is advisory; the prolog takes 4).
V2_LITE_NPU_16 = dataclasses.replace(V2_LITE_NPU, num_heads=16, name="v2-lite-npu-16h")


@pytest.mark.parametrize("config, target, dtype, phases, kernels", [
    (V3_TINY, "npu", torch.float32, ["decode", "prefill"], {}),
    (V2_LITE_TINY, "npu", torch.float32, ["decode", "prefill"], {}),
    (V3_TINY, "torchair", torch.bfloat16, ["decode", "prefill"], {}),
    (V2_LITE_TINY, "torchair", torch.bfloat16, ["decode", "prefill"], {}),
    (V2_LITE_NPU_16, "npu", torch.bfloat16, ["decode", "prefill"],
     {"decode": ("npu.npu_fused_infer_attention_score.default", "BNSD"),
      "prefill": ("npu.npu_fused_infer_attention_score.default", "TND")}),
    (V3_NPU, "torchair", torch.bfloat16, ["decode"],
     {"decode": ("air.npu_fused_infer_attention_score.default", "BNSD")}),
], ids=["v3-npu-fp32", "v2lite-npu-fp32", "v3-torchair-bf16", "v2lite-torchair-bf16", "v2litenpu16-npu-bf16",
        "v3npu-torchair-bf16"])
def test_lowered_targets_with_a_share_of_heads(config, target, dtype, phases, kernels):
    """npu and torchair graphs at tp 2 agree with each rank's plain layer. Where the kernels admit
    the dims, FIA takes the rank's head count (BNSD: one latent key head; TND: as many as queries)
    and V3's fused prolog its share of heads; the tiny configs take the aten fallbacks instead."""
    from mla_graph.checking import compare_with_plain

    heads = config.num_heads // 2
    for rank in range(2):
        std = 0.02 if config in (V3_NPU, V2_LITE_NPU_16) else 0.2
        layer = randomize(MLAAttention(config, dtype=dtype, tp_size=2, tp_rank=rank), seed=rank, std=std)
        lowered = lower(layer, target, phases, block_size=16)
        for phase in phases:
            gm = lowered.graph_for(phase)
            fia = [n for n in gm.graph.nodes if "fused_infer_attention" in str(n.target)]
            if phase not in kernels:
                assert fia == [], (rank, phase)
                # the aten fallback's scores [T, heads of this rank, S]
                [softmax] = [n for n in gm.graph.nodes if n.target is torch.ops.aten._softmax.default]
                assert softmax.meta["val"].shape[1] == heads, (rank, phase)
            else:
                op, layout = kernels[phase]
                assert [(str(n.target), n.kwargs["input_layout"], n.kwargs["num_heads"]) for n in fia] == \
                    [(op, layout, heads)], (rank, phase)
                assert fia[0].kwargs["num_key_value_heads"] == (1 if layout == "BNSD" else heads)
            if config is V3_NPU:
                [prolog] = [n for n in gm.graph.nodes if n.target is torch.ops.npu.npu_mla_prolog_v3_functional.default]
                query, query_rope = prolog.meta["val"][:2]     # [T, heads of this rank, L / R]
                assert query.shape[1:] == (heads, config.kv_lora_rank) and query_rope.shape[1] == heads
            assert compare_with_plain(layer, lowered, phase, seed=rank).ok, (rank, phase)

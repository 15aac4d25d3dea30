"""Each rank holds num_heads / tp_size heads; the ranks' partial outputs add up to the full layer."""
import pytest
import torch
from conftest import TOL, V3_TINY, randomize
from hf_oracle import hf_attention, hf_prefill

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
        assert gm.meta["mla_num_heads"] == config.num_heads // tp_size
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


@pytest.mark.parametrize("target, dtype", [("npu", torch.float32), ("torchair", torch.bfloat16)])
def test_lowered_targets_with_a_share_of_heads(config, target, dtype):
    """npu and torchair graphs at tp 2 (FIA's head count, the per-rank prolog and absorbed weights)
    agree with each rank's plain layer, decode and prefill."""
    from mla_graph.checking import compare_with_plain

    for rank in range(2):
        layer = randomize(MLAAttention(config, dtype=dtype, tp_size=2, tp_rank=rank), seed=rank)
        lowered = lower(layer, target, ["decode", "prefill"], block_size=16)
        fia = [n for n in lowered.graph_for("decode").graph.nodes if "fused_infer_attention" in str(n.target)]
        assert len(fia) == 1 and fia[0].kwargs["num_heads"] == config.num_heads // 2
        for phase in ("decode", "prefill"):
            assert compare_with_plain(layer, lowered, phase, seed=rank).ok, (rank, phase)

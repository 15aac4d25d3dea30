"""The one definition equals Hugging Face's DeepseekV3Attention (same weights, same inputs)."""
import pytest
import torch
from conftest import TOL, randomize
from hf_oracle import hf_attention, hf_prefill

from mla_graph import MLAAttention, PagedLatentCache, build_metadata, positions_for


def _pair(config, dtype, seed=0):
    hf, rotary = hf_attention(config, dtype)
    randomize(hf, seed)
    ours = MLAAttention(config, dtype=dtype)
    ours.load_state_dict(hf.state_dict(), strict=True)  # HF parameter names load unchanged
    return ours.requires_grad_(False), hf, rotary


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_equals_hf(config, dtype):
    ours, hf, rotary = _pair(config, dtype)
    requests = [(13, 0), (29, 0), (4, 0)]  # three prompts in one flat batch
    cache = PagedLatentCache.allocate(config, 16, 16, dtype=dtype, shuffle_blocks=True)
    rows = [cache.allocator.grow([], n, 16) for n, _ in requests]
    metadata = build_metadata(requests, rows, 16)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(sum(n for n, _ in requests), config.hidden_size, generator=gen).to(dtype)
    out = ours(x, positions_for(requests), cache, metadata)
    rtol, atol = TOL[dtype]
    start = 0
    for n, _ in requests:
        with torch.no_grad():
            expected = hf_prefill(hf, rotary, x[start:start + n])
        torch.testing.assert_close(out[start:start + n], expected, rtol=rtol, atol=atol)
        start += n


def test_oracle_is_sensitive():
    """The comparison above can fail: a wrong softmax scale or rope position is caught."""
    from conftest import V3_TINY
    ours, hf, rotary = _pair(V3_TINY, torch.float32)
    requests = [(9, 0)]
    cache = PagedLatentCache.allocate(V3_TINY, 4, 16)
    metadata = build_metadata(requests, [cache.allocator.grow([], 9, 16)], 16)
    x = torch.randn(9, V3_TINY.hidden_size)
    expected = hf_prefill(hf, rotary, x)
    positions = positions_for(requests)
    positions[-1] += 3  # rope is relative: only a change in relative position shows
    shifted = ours(x, positions, cache.clone(), metadata)
    assert not torch.allclose(shifted, expected, rtol=1e-3, atol=1e-3)
    ours.scale *= 1.05
    rescaled = ours(x, positions_for(requests), cache.clone(), metadata)
    assert not torch.allclose(rescaled, expected, rtol=1e-3, atol=1e-3)


def test_softmax_scale_includes_yarn_mscale(config):
    hf, _ = hf_attention(config, torch.float32)
    assert MLAAttention(config).scale == pytest.approx(hf.scaling, rel=1e-12)

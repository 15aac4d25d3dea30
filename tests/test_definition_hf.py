"""The one definition equals Hugging Face's DeepseekV3Attention (same weights, same inputs)."""
import math

import pytest
import torch
from conftest import CONFIGS, MSCALE_CONFIGS, TOL, V2_LITE_NPU, V3_NPU, V3_TINY, randomize
from hf_oracle import hf_attention, hf_prefill

from mla_graph import MLAAttention, MLAConfig, PagedLatentCache, YarnScaling, build_metadata, positions_for
from mla_graph.rope import cos_sin_table, inverse_frequencies


def _yarn(**fields) -> YarnScaling:
    return YarnScaling(**{"factor": 8, "original_max_position_embeddings": 128, "mscale": 1.0,
                          "mscale_all_dim": 1.0, **fields})


# ...and the other branches of the rope table: no yarn; yarn without mscale_all_dim (the table's
# factor is then mscale(factor), whatever mscale says, and the softmax scale has none); a ramp that
# starts past dim 0 (the real presets' original length 4096); a correction range clamped at
# dim - 1 (a small rope_theta); and an empty range (low == high), at 0 (an original length of 4) and
# at dim - 1 (beta_fast == beta_slow, as Kimi-K2's).
ROPE_CONFIGS = {**CONFIGS, **MSCALE_CONFIGS, "v3-npu": V3_NPU, "v2lite-npu": V2_LITE_NPU,
                "v3-no-yarn": V3_TINY.replace(rope_scaling=None),
                "v3-yarn-no-mscale-all-dim": V3_TINY.replace(rope_scaling=_yarn(mscale=0.707, mscale_all_dim=0.0)),
                "v3-rope64-original-4096": V3_TINY.replace(qk_rope_head_dim=64, rope_scaling=_yarn(
                    factor=40, original_max_position_embeddings=4096)),
                "v3-small-theta": V3_TINY.replace(rope_theta=5.0, rope_scaling=_yarn()),
                "v3-empty-ramp": V3_TINY.replace(rope_scaling=_yarn(original_max_position_embeddings=4)),
                "v3-empty-ramp-at-dim": V3_TINY.replace(rope_theta=20.0, rope_scaling=_yarn(
                    original_max_position_embeddings=2000, beta_fast=1, beta_slow=1))}


def _pair(config, dtype, seed=0):
    hf, rotary = hf_attention(config, dtype)
    randomize(hf, seed)
    ours = MLAAttention(config, dtype=dtype)
    ours.load_state_dict(hf.state_dict(), strict=True)  # HF parameter names load unchanged
    return ours.requires_grad_(False), hf, rotary


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_equals_hf(config, dtype):
    _assert_prefill_equals_hf(config, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(MSCALE_CONFIGS))
def test_prefill_equals_hf_with_mscale_unlike_mscale_all_dim(name, dtype):
    """Yarn's rope factor mscale(f, mscale) / mscale(f, mscale_all_dim) is not 1 here: a rope
    table without it (or with the ratio inverted) puts the rope half of every score off by ~10%."""
    _assert_prefill_equals_hf(MSCALE_CONFIGS[name], dtype)


@pytest.mark.parametrize("name", list(ROPE_CONFIGS))
def test_rope_table_equals_hf_rotary_embedding(name):
    """Every row of our cos/sin table against Hugging Face's yarn rotary embedding (its cos/sin
    carry the same attention factor). Float32 on both sides; the angle p * inv_freq differs by the
    rounding of inv_freq (relative eps) times p, plus the rounding of the product: the tolerance is
    2 eps (p + 1) * mscale, about 2.4e-4 at position 1023, while a missing mscale is off by ~5%."""
    config = ROPE_CONFIGS[name]
    _, rotary = hf_attention(config, torch.float32)
    positions = torch.arange(config.max_position_embeddings)
    cos, sin = rotary(torch.zeros(1, 1, 1), positions[None])
    half = config.qk_rope_head_dim // 2
    table = cos_sin_table(config)
    assert table.shape == (config.max_position_embeddings, 2 * half) and table.dtype == torch.float32
    tol = 2 * torch.finfo(torch.float32).eps * (positions[:, None] + 1) * rotary.attention_scaling
    for ours, theirs, what in ((table[:, :half], cos[0, :, :half], "cos"), (table[:, half:], sin[0, :, :half], "sin")):
        diff = (ours - theirs).abs()
        worst = int((diff - tol).max(1).values.argmax())
        assert (diff <= tol).all(), (f"{name}: {what} at position {worst} differs by {float(diff[worst].max()):.3g}, "
                                     f"tolerance {float(tol[worst, 0]):.3g}")


def _assert_prefill_equals_hf(config, dtype):
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
    ours.checked = False  # checked mode would reject the wrong position before the comparison
    shifted = ours(x, positions, cache.clone(), metadata)
    assert not torch.allclose(shifted, expected, rtol=1e-3, atol=1e-3)
    ours.scale *= 1.05
    rescaled = ours(x, positions_for(requests), cache.clone(), metadata)
    assert not torch.allclose(rescaled, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", list(ROPE_CONFIGS))
def test_softmax_scale_includes_yarn_mscale(name):
    config = ROPE_CONFIGS[name]
    hf, _ = hf_attention(config, torch.float32)
    assert MLAAttention(config).scale == pytest.approx(hf.scaling, rel=1e-12)


def test_rope_table_is_built_once_per_configuration():
    """Every layer of a model (equal configs, whatever their names) reads the same tensor."""
    table = cos_sin_table(V3_TINY)
    assert cos_sin_table(V3_TINY.replace(name="layer 2")) is table
    assert cos_sin_table(V3_TINY.replace(rope_theta=500.0)) is not table


def _yarn_inverse_frequencies(config) -> list[float]:
    """DeepSeek's yarn inverse frequencies, in double precision: per pair i, blend 1 / base**(2i/d)
    (extrapolation) with it divided by factor (interpolation) by a ramp from 0 at dim `low` to 1 at
    `high`, where low/high are the dims whose wavelength turns beta_fast/beta_slow times in the
    original context (floored/ceiled, clamped to [0, d - 1])."""
    d, base, yarn = config.qk_rope_head_dim, config.rope_theta, config.rope_scaling
    freqs = [1.0 / base ** (2 * i / d) for i in range(d // 2)]
    if yarn is None:
        return freqs

    def turning_dim(turns: float) -> float:
        return d * math.log(yarn.original_max_position_embeddings / (turns * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(turning_dim(yarn.beta_fast)), 0)
    high = min(math.ceil(turning_dim(yarn.beta_slow)), d - 1)
    if low == high:
        high += 0.001
    ramps = [min(max((i - low) / (high - low), 0.0), 1.0) for i in range(d // 2)]
    return [f / yarn.factor * r + f * (1 - r) for f, r in zip(freqs, ramps)]


@pytest.mark.parametrize("name", list(ROPE_CONFIGS) + ["deepseek-v3", "deepseek-v2-lite", "kimi-k2"])
def test_inverse_frequencies_are_the_yarn_formula_rounded_once(name):
    """Computed in double precision and rounded once to float32, bit for bit (a float32
    computation is an ulp off in some pairs)."""
    config = ROPE_CONFIGS.get(name) or MLAConfig.preset(name)
    expected = torch.tensor(_yarn_inverse_frequencies(config), dtype=torch.float64).float()
    got = inverse_frequencies(config)
    assert got.dtype == torch.float32 and torch.equal(got, expected), (got - expected).abs().max()

"""DeepSeek rotary tables: plain rope and yarn scaling, as DeepSeek's reference code computes them.

The table is `cat(cos(freqs), sin(freqs)) * mscale`, one row per position, float32. Rows are
read by position at run time (`mla::rope`), so one table serves every layer of a model: it is
built once per configuration and shared.
"""
from __future__ import annotations

import functools
import math

import torch

from .config import MLAConfig, yarn_get_mscale


def inverse_frequencies(config: MLAConfig) -> torch.Tensor:
    dim = config.qk_rope_head_dim
    base = config.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    extrapolation = 1.0 / pos_freqs
    yarn = config.rope_scaling
    if yarn is None:
        return extrapolation.float()
    interpolation = 1.0 / (yarn.factor * pos_freqs)
    low, high = _correction_range(yarn.beta_fast, yarn.beta_slow, dim, base,
                                  yarn.original_max_position_embeddings)
    keep_extrapolation = 1.0 - _linear_ramp(low, high, dim // 2)
    return (interpolation * (1 - keep_extrapolation) + extrapolation * keep_extrapolation).float()


def attention_mscale(config: MLAConfig) -> float:
    """The factor DeepSeek multiplies into cos/sin: mscale(f, mscale) / mscale(f, mscale_all_dim)."""
    yarn = config.rope_scaling
    if yarn is None:
        return 1.0
    if yarn.mscale and yarn.mscale_all_dim:
        return yarn_get_mscale(yarn.factor, yarn.mscale) / yarn_get_mscale(yarn.factor, yarn.mscale_all_dim)
    return yarn_get_mscale(yarn.factor)


@functools.lru_cache(maxsize=16)
def _cached_table(config: MLAConfig) -> torch.Tensor:
    inv_freq = inverse_frequencies(config)
    positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)
    scale = attention_mscale(config)
    table = torch.cat([freqs.cos() * scale, freqs.sin() * scale], dim=-1)
    table.requires_grad_(False)
    return table


def cos_sin_table(config: MLAConfig) -> torch.Tensor:
    """[max_position_embeddings, qk_rope_head_dim] float32; shared by equal configs (every layer of
    a model), never written."""
    return _cached_table(config)


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def _correction_range(beta_fast: float, beta_slow: float, dim: int, base: float,
                      max_pos: int) -> tuple[float, float]:
    low = math.floor(_correction_dim(beta_fast, dim, base, max_pos))
    high = math.ceil(_correction_dim(beta_slow, dim, base, max_pos))
    return max(low, 0), min(high, dim - 1)


def _linear_ramp(low: float, high: float, dim: int) -> torch.Tensor:
    if low == high:
        high += 0.001  # avoids a division by zero, as DeepSeek's code does
    ramp = (torch.arange(dim, dtype=torch.float64) - low) / (high - low)
    return ramp.clamp(0, 1)

"""Arguments of one npu_mla_prolog_v3 call inside the op's documented limits (doc L9604-L9663),
small in tokens and heads; every dim can be overridden to step outside them.

Random data throughout: gammas are not ones, caches are pre-filled (a stray write shows),
and cache_index picks distinct random slots.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mla_graph.npu import ensure_npu_ops

NZ_WEIGHTS = ("weight_dq", "weight_uq_qr", "weight_dkv_kr")
FRACTAL_NZ = 29


@dataclass(frozen=True)
class PrologDims:
    tokens: int = 3
    hidden: int = 6144       # He: 7168, 7680 or 6144; the smallest keeps the test fast
    q_lora: int = 1536       # Hcq
    heads: int = 2           # N
    nope: int = 128          # D
    rope: int = 64           # Dr
    latent: int = 512        # Hckv
    block_size: int = 16
    blocks: int = 2


def prolog_args(dims: PrologDims = PrologDims(), *, token_dtype: torch.dtype = torch.bfloat16,
                nz: tuple[str, ...] = NZ_WEIGHTS, seed: int = 0) -> dict:
    """Keyword arguments for torch.ops.npu.npu_mla_prolog_v3 (weights in `nz` cast to FRACTAL_NZ)."""
    ensure_npu_ops()
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale + shift).to(torch.bfloat16)

    d = dims
    weights = {"weight_dq": rand(d.hidden, d.q_lora, scale=d.hidden ** -0.5),
               "weight_uq_qr": rand(d.q_lora, d.heads * (d.nope + d.rope), scale=d.q_lora ** -0.5),
               "weight_uk": rand(d.heads, d.nope, d.latent, scale=d.nope ** -0.5),
               "weight_dkv_kr": rand(d.hidden, d.latent + d.rope, scale=d.hidden ** -0.5)}
    for name in nz:
        weights[name] = torch.ops.npu.npu_format_cast(weights[name], FRACTAL_NZ)
    theta = torch.rand(d.tokens, d.rope // 2, generator=gen) * 6
    cos, sin = (torch.cat([f(theta)] * 2, -1).to(torch.bfloat16) for f in (torch.cos, torch.sin))
    slots = torch.randperm(d.blocks * d.block_size, generator=gen)[:d.tokens]
    return dict(token_x=rand(d.tokens, d.hidden).to(token_dtype), **weights,
                rmsnorm_gamma_cq=rand(d.q_lora, scale=0.2, shift=1.0),
                rmsnorm_gamma_ckv=rand(d.latent, scale=0.2, shift=1.0), rope_sin=sin, rope_cos=cos,
                kv_cache=rand(d.blocks, d.block_size, 1, d.latent), kr_cache=rand(d.blocks, d.block_size, 1, d.rope),
                cache_index=slots)

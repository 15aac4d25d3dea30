"""Random batches of each phase, and the numerical check of a lowered module against the plain one."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import MLAAttention
from .cache import PADDING_BLOCK, PagedLatentCache
from .metadata import MLAMetadata, build_metadata, positions_for

# One batch shape per phase: (new_tokens, cached_tokens) per request, decodes first.
PHASE_BATCHES: dict[str, list[tuple[int, int]]] = {
    "decode": [(1, 37), (1, 5), (1, 130)],
    "prefill": [(9, 0), (6, 21)],
    "mixed": [(1, 19), (1, 3), (7, 0), (5, 12)],
    "multi_decode": [(4, 37), (1, 5), (3, 130)],   # 1 + up to 3 draft tokens a request
    "multi_mixed": [(3, 19), (1, 3), (7, 0), (5, 12)],
}

# (rtol, atol) for a whole layer, plain vs lowered: several reductions in another order.
LAYER_TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 3e-2), torch.float16: (5e-3, 5e-3)}


@dataclass
class Batch:
    hidden_states: torch.Tensor
    positions: torch.Tensor
    cache: PagedLatentCache
    metadata: MLAMetadata


def random_batch(layer: MLAAttention, requests: list[tuple[int, int]], *, block_size: int,
                 seed: int = 0, decode_tokens: int = 1) -> Batch:
    """A batch whose cached prefixes are random cache contents in shuffled blocks (`decode_tokens`:
    as build_metadata's)."""
    gen = torch.Generator().manual_seed(seed)
    config, dtype = layer.config, layer.dtype
    blocks_needed = sum(-(-(n + c) // block_size) for n, c in requests) + 2
    cache = PagedLatentCache.allocate(config, blocks_needed, block_size, dtype=dtype,
                                      shuffle_blocks=True, seed=seed)
    cache.latent.copy_(torch.randn(cache.latent.shape, generator=gen).to(dtype))
    cache.rope.copy_(torch.randn(cache.rope.shape, generator=gen).to(dtype))
    rows = [cache.allocator.grow([], n + c, block_size) for n, c in requests]
    metadata = build_metadata(requests, rows, block_size, decode_tokens=decode_tokens)
    tokens = sum(n for n, _ in requests)
    hidden = torch.randn(tokens, config.hidden_size, generator=gen).to(dtype)
    return Batch(hidden, positions_for(requests), cache, metadata)


@dataclass
class Agreement:
    phase: str
    max_abs_error: float
    max_abs_reference: float
    cache_equal: bool
    ok: bool


def compare_with_plain(layer: MLAAttention, lowered: torch.nn.Module, phase: str, *, seed: int = 0) -> Agreement:
    """Run one random batch of `phase` through `layer` and `lowered`; outputs and caches must agree."""
    batch = random_batch(layer, PHASE_BATCHES[phase], block_size=lowered.block_size, seed=seed,
                         decode_tokens=4 if phase.startswith("multi_") else 1)
    batch.metadata.validate(batch.cache, batch.hidden_states.shape[0])
    ref_cache, low_cache = batch.cache.clone(), batch.cache.clone()
    with torch.no_grad():
        expected = layer(batch.hidden_states, batch.positions, ref_cache, batch.metadata)
        actual = lowered(batch.hidden_states, batch.positions, low_cache, batch.metadata)
    rtol, atol = LAYER_TOLERANCES[layer.dtype]
    err = (actual.float() - expected.float()).abs()
    ok_out = bool((err <= atol + rtol * expected.float().abs()).all())
    # Every block but the padding block (graph-mode decode writes its padded rows there; no request
    # owns it and nothing reads it).
    owned = [b for b in range(batch.cache.num_blocks) if b != PADDING_BLOCK]
    cache_equal = all(torch.allclose(a[owned].float(), b[owned].float(), rtol=rtol, atol=atol)
                      for a, b in ((ref_cache.latent, low_cache.latent), (ref_cache.rope, low_cache.rope)))
    return Agreement(phase, float(err.max()), float(expected.float().abs().max()), cache_equal,
                     ok_out and cache_equal)

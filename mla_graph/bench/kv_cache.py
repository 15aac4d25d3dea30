"""4. KV cache bytes per token per layer: our paged latent cache vs decompressed K and V, per preset."""
from __future__ import annotations

from ..cache import PagedLatentCache
from ..config import MLAConfig, preset_names
from .settings import Settings


def kv_cache_bytes(s: Settings) -> dict:
    """Per token per layer (all heads, tp 1): our paged latent cache, measured from an allocated
    cache, vs a cache of decompressed K and V (num_heads x (qk_head_dim + v_head_dim))."""
    out = {"dtype": str(s.dtype).replace("torch.", ""), "presets": {}}
    for name in preset_names():
        config = MLAConfig.preset(name)
        cache = PagedLatentCache.allocate(config, 1, s.block_size, dtype=s.dtype)
        ours = (cache.latent.nbytes + cache.rope.nbytes) // s.block_size
        full = config.num_heads * (config.qk_head_dim + config.v_head_dim) * cache.latent.element_size()
        out["presets"][name] = {"latent": ours, "decompressed_kv": full, "ratio": full / ours}
    return out

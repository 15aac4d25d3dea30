"""A mixed batch (decodes first, then prefills with a cached prefix) equals each request alone."""
import torch
from conftest import TOL, randomize

from mla_graph import MLAAttention, PagedLatentCache, build_metadata, positions_for


def test_mixed_batch_equals_requests_alone(config):
    dtype, block_size = torch.float32, 16
    layer = randomize(MLAAttention(config, dtype=dtype))
    requests = [(1, 20), (1, 33), (1, 2), (7, 0), (9, 18)]   # 3 decodes, a fresh prompt, a cached prefix
    gen = torch.Generator().manual_seed(4)
    cache = PagedLatentCache.allocate(config, 32, block_size, dtype=dtype, shuffle_blocks=True, seed=5)
    cache.latent.copy_(torch.randn(cache.latent.shape, generator=gen))
    cache.rope.copy_(torch.randn(cache.rope.shape, generator=gen))
    rows = [cache.allocator.grow([], n + c, block_size) for n, c in requests]
    x = torch.randn(sum(n for n, _ in requests), config.hidden_size, generator=gen)
    metadata = build_metadata(requests, rows, block_size)
    assert (metadata.num_decodes, metadata.num_prefills, metadata.phase) == (3, 2, "mixed")
    batched_cache = cache.clone()
    out = layer(x, positions_for(requests), batched_cache, metadata)

    rtol, atol = TOL[dtype]
    start = 0
    for (n, c), row in zip(requests, rows):
        alone_cache = cache.clone()
        alone = layer(x[start:start + n], positions_for([(n, c)]), alone_cache, build_metadata([(n, c)], [row], block_size))
        torch.testing.assert_close(out[start:start + n], alone, rtol=rtol, atol=atol)
        start += n
    assert not torch.equal(batched_cache.latent, cache.latent)  # the batch wrote its new tokens

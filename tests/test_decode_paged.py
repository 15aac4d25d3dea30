"""Decode over the paged cache, step by step, equals recomputing each sequence in one prefill."""
import pytest
import torch
from conftest import TOL, randomize

from mla_graph import MLAAttention, PagedLatentCache, build_metadata, positions_for


@pytest.mark.parametrize("block_size", [16, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_step_decode_equals_one_prefill(config, dtype, block_size):
    layer = randomize(MLAAttention(config, dtype=dtype))
    prompts = [5, 23, 17]      # partially filled blocks at both block sizes
    steps = 6 if block_size == 16 else 3
    gen = torch.Generator().manual_seed(2)
    total = [p + steps for p in prompts]
    x = [torch.randn(n, config.hidden_size, generator=gen).to(dtype) for n in total]

    cache = PagedLatentCache.allocate(config, 40, block_size, dtype=dtype, shuffle_blocks=True, seed=3)
    rows = [[] for _ in prompts]
    requests = [(p, 0) for p in prompts]
    for row, (n, c) in zip(rows, requests):
        cache.allocator.grow(row, n + c, block_size)
    layer(torch.cat([xi[:p] for xi, p in zip(x, prompts)]), positions_for(requests), cache,
          build_metadata(requests, rows, block_size))
    decoded = [[] for _ in prompts]
    for step in range(steps):
        requests = [(1, p + step) for p in prompts]
        for row, (n, c) in zip(rows, requests):
            cache.allocator.grow(row, n + c, block_size)
        metadata = build_metadata(requests, rows, block_size)
        metadata.validate(cache, len(prompts))
        out = layer(torch.stack([xi[p + step] for xi, p in zip(x, prompts)]), positions_for(requests),
                    cache, metadata)
        for b in range(len(prompts)):
            decoded[b].append(out[b])
    used = [b for r in rows for b in r]   # the shuffled allocator handed out scattered blocks
    assert sorted(used) != list(range(len(used)))

    rtol, atol = TOL[dtype]
    for b, n in enumerate(total):
        fresh = PagedLatentCache.allocate(config, 40, block_size, dtype=dtype)
        row = fresh.allocator.grow([], n, block_size)
        full = layer(x[b], positions_for([(n, 0)]), fresh, build_metadata([(n, 0)], [row], block_size))
        torch.testing.assert_close(torch.stack(decoded[b]), full[prompts[b]:], rtol=rtol, atol=atol)
        # the paged cache holds the same latent and rope rows as the one-shot prefill wrote
        for t in range(n):
            got = cache.latent[rows[b][t // block_size], t % block_size]
            want = fresh.latent[row[t // block_size], t % block_size]
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol)

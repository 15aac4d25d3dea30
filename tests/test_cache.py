"""The paged latent cache: the block allocator (never the padding block) and the layout checks."""
import pytest
import torch
from conftest import V3_TINY

from mla_graph import PagedLatentCache
from mla_graph.cache import PADDING_BLOCK, BlockAllocator, CacheFullError


def test_allocator_hands_out_every_block_but_the_padding_block_in_order():
    alloc = BlockAllocator(5)
    assert alloc.num_blocks == 5 and alloc.num_free == 4
    assert alloc.allocate(2) == [1, 2] and alloc.allocate(2) == [3, 4]
    assert alloc.num_free == 0
    with pytest.raises(CacheFullError, match=f"need 1 free blocks, only 0 of 5 left \\(block {PADDING_BLOCK} is "
                                             "the padding block, never handed out\\)"):
        alloc.allocate(1)
    alloc.free([3, 1])
    assert alloc.num_free == 2 and alloc.allocate(2) == [3, 1]   # freed blocks come back in the order given


def test_shuffled_allocator_is_a_seeded_permutation_without_the_padding_block():
    first = BlockAllocator(40, shuffle=True, seed=3).allocate(39)
    assert sorted(first) == list(range(1, 40)) and first != sorted(first)
    assert BlockAllocator(40, shuffle=True, seed=3).allocate(39) == first
    assert BlockAllocator(40, shuffle=True, seed=4).allocate(39) != first


def test_grow_adds_blocks_only_when_the_row_is_full():
    alloc = BlockAllocator(10)
    row = alloc.grow([], 16, 16)
    assert row == [1]
    assert alloc.grow(row, 16, 16) is row and row == [1]      # 16 tokens fit one block of 16
    assert alloc.grow(row, 17, 16) == [1, 2]
    assert alloc.grow(row, 49, 16) == [1, 2, 3, 4] and alloc.num_free == 5


@pytest.mark.parametrize("num_blocks", [0, 2.5, True])
def test_allocator_needs_a_positive_int_number_of_blocks(num_blocks):
    with pytest.raises(ValueError, match="num_blocks"):
        BlockAllocator(num_blocks)


def test_allocator_defaults_in_order_and_seed_zero():
    assert BlockAllocator(1).num_free == 0
    assert BlockAllocator(6).allocate(5) == [1, 2, 3, 4, 5]
    assert BlockAllocator(20, shuffle=True).allocate(19) == BlockAllocator(20, shuffle=True, seed=0).allocate(19)
    assert PagedLatentCache.allocate(V3_TINY, 6, 4).allocator.allocate(5) == [1, 2, 3, 4, 5]
    assert (PagedLatentCache.allocate(V3_TINY, 20, 4, shuffle_blocks=True).allocator.allocate(19)
            == BlockAllocator(20, shuffle=True, seed=0).allocate(19))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_allocate_gives_zeroed_caches_of_the_layout_the_kernels_use(dtype):
    cache = PagedLatentCache.allocate(V3_TINY, 6, 16, dtype=dtype, shuffle_blocks=True, seed=1)
    assert cache.latent.shape == (6, 16, 1, V3_TINY.kv_lora_rank)
    assert cache.rope.shape == (6, 16, 1, V3_TINY.qk_rope_head_dim)
    assert (cache.num_blocks, cache.block_size, cache.dtype) == (6, 16, dtype)
    assert cache.latent.dtype == cache.rope.dtype == dtype
    assert not cache.latent.any() and not cache.rope.any()
    assert cache.allocator.num_blocks == 6
    assert cache.allocator.allocate(5) == BlockAllocator(6, shuffle=True, seed=1).allocate(5)
    cache.check(V3_TINY)
    smallest = PagedLatentCache.allocate(V3_TINY, 1, 1)
    assert smallest.latent.shape == (1, 1, 1, V3_TINY.kv_lora_rank)
    on_meta = PagedLatentCache.allocate(V3_TINY, 2, 4, device="meta")
    assert on_meta.latent.device.type == on_meta.rope.device.type == "meta"


@pytest.mark.parametrize("num_blocks, block_size, dtype, message", [
    (0, 16, torch.float32, "num_blocks must be a positive int, got 0"),
    (2.5, 16, torch.float32, "num_blocks must be a positive int, got 2.5"),
    (4, 0, torch.float32, "block_size must be a positive int, got 0"),
    (4, True, torch.float32, "block_size must be a positive int, got True"),
    (4, 16, torch.int32, "dtype must be a floating torch.dtype \\(the layer's\\), got torch.int32"),
])
def test_allocate_rejects_bad_sizes_and_dtypes(num_blocks, block_size, dtype, message):
    with pytest.raises(ValueError, match=message):
        PagedLatentCache.allocate(V3_TINY, num_blocks, block_size, dtype=dtype)


def test_clone_copies_the_contents_not_the_allocator():
    cache = PagedLatentCache.allocate(V3_TINY, 3, 4)
    cache.latent.fill_(2.0)
    copy = cache.clone()
    assert copy.allocator is None and torch.equal(copy.latent, cache.latent) and torch.equal(copy.rope, cache.rope)
    copy.latent.fill_(5.0)
    copy.rope.fill_(5.0)
    assert (cache.latent == 2).all() and not cache.rope.any()


def test_check_accepts_row_strided_views_of_one_cache():
    """vLLM's [blocks, block_size, 1, latent + rope] tensor, viewed as the two parts."""
    L, R = V3_TINY.kv_lora_rank, V3_TINY.qk_rope_head_dim
    one = torch.zeros(4, 16, 1, L + R)
    PagedLatentCache(one[..., :L], one[..., L:]).check(V3_TINY)
    # the size-1 head axis may have any stride: only blocks, rows and the unit last stride matter
    odd = torch.zeros(4 * 16 * L).as_strided((4, 16, 1, L), (16 * L, L, 7, 1))
    PagedLatentCache(odd, torch.zeros(4, 16, 1, R)).check(V3_TINY)


@pytest.mark.parametrize("latent, rope, message", [
    (torch.zeros(4, 16, 1, 47), torch.zeros(4, 16, 1, 8),
     "kv_cache.latent must be \\[num_blocks, block_size, 1, 48\\], got \\[4, 16, 1, 47\\]"),
    (torch.zeros(4, 16, 2, 48), torch.zeros(4, 16, 1, 8),
     "kv_cache.latent must be \\[num_blocks, block_size, 1, 48\\]"),
    (torch.zeros(4, 16, 48), torch.zeros(4, 16, 1, 8), "kv_cache.latent must be \\[num_blocks, block_size, 1, 48\\]"),
    (torch.zeros(4, 16, 1, 48), torch.zeros(4, 16, 1, 6), "kv_cache.rope must be \\[num_blocks, block_size, 1, 8\\]"),
    (torch.zeros(4, 16, 1, 48), torch.zeros(4, 8, 1, 8), "kv_cache.latent \\[4, 16, 1, 48\\] and kv_cache.rope "
                                                         "\\[4, 8, 1, 8\\] disagree on \\[num_blocks, block_size\\]"),
    (torch.zeros(4, 16, 1, 48), torch.zeros(3, 16, 1, 8), "disagree on \\[num_blocks, block_size\\]"),
    (torch.zeros(4, 16, 1, 48), torch.zeros(4, 16, 1, 8, dtype=torch.bfloat16),
     "kv_cache.latent is torch.float32 but kv_cache.rope is torch.bfloat16"),
    (torch.zeros(4, 16, 1, 96)[..., ::2], torch.zeros(4, 16, 1, 8), "unit stride in the last dim"),
    (torch.zeros(16, 4, 1, 48).transpose(0, 1), torch.zeros(4, 16, 1, 8), "blocks of consecutive rows"),
], ids=["latent-width", "heads", "rank", "rope-width", "block-size", "num-blocks", "dtype", "last-stride",
        "block-stride"])
def test_check_names_what_is_wrong(latent, rope, message):
    with pytest.raises(ValueError, match=message):
        PagedLatentCache(latent, rope).check(V3_TINY)

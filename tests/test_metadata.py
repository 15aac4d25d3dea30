"""Metadata validation: each inconsistency is named; a rejected call writes nothing."""
import dataclasses

import pytest
import torch
from conftest import V3_TINY, randomize

from mla_graph import MLAAttention, MetadataError, PagedLatentCache, build_metadata, lower, positions_for

BS = 16


def _setup():
    cache = PagedLatentCache.allocate(V3_TINY, 8, BS, shuffle_blocks=True)
    requests = [(1, 20), (5, 0), (3, 13)]
    rows = [cache.allocator.grow([], n + c, BS) for n, c in requests]
    return cache, requests, rows, build_metadata(requests, rows, BS)


def test_builder_output_is_consistent():
    cache, requests, rows, md = _setup()
    md.validate(cache, num_tokens=9)
    assert md.query_start_loc.tolist() == [0, 1, 6, 9]
    assert md.seq_lens.tolist() == [21, 5, 16]
    assert (md.num_decodes, md.num_decode_tokens, md.num_prefills) == (1, 1, 2)
    pos = 20  # request 0's new token
    assert md.slot_mapping[0].item() == rows[0][pos // BS] * BS + pos % BS


def _broken(md, cache, **changes):
    return dataclasses.replace(md, **changes)


@pytest.mark.parametrize("change, message", [
    (lambda md, c: dict(slot_mapping=md.slot_mapping.index_fill(0, torch.tensor([8]), 8 * BS + 3)),
     "slot_mapping\\[8\\] = 131 out of range \\[0, 128\\)"),
    (lambda md, c: dict(slot_mapping=md.slot_mapping.roll(1)), "but request 0 position 20 lives in slot"),
    (lambda md, c: dict(seq_lens=torch.tensor([40, 5, 16], dtype=torch.int32)),
     "request 0: context of 40 tokens is longer than its 2 blocks of 16"),
    (lambda md, c: dict(block_table=torch.where(md.block_table == md.block_table[1, 0], 99, md.block_table)),
     "block ids \\[99\\] out of range \\[0, 8\\)"),
    (lambda md, c: dict(query_start_loc=torch.tensor([0, 5, 6, 9], dtype=torch.int32)),
     "the first 1 requests' query lengths \\[5\\] sum to 5 \\(query lengths \\[5, 1, 3\\]\\)"),
    (lambda md, c: dict(query_start_loc=torch.tensor([0, 2, 3, 9], dtype=torch.int32)),
     "the first 1 requests' query lengths \\[2\\] sum to 2"),
    (lambda md, c: dict(query_start_loc=torch.tensor([1, 2, 7, 9], dtype=torch.int32)),
     "query_start_loc must start at 0 and never decrease, got \\[1, 2, 7, 9\\]"),
    (lambda md, c: dict(query_start_loc=torch.tensor([0, 5, 4, 9], dtype=torch.int32)),
     "query_start_loc must start at 0 and never decrease"),
    (lambda md, c: dict(query_start_loc=torch.tensor([0, 1, 1, 9], dtype=torch.int32)),
     "request 1 has no new tokens \\(query_start_loc \\[0, 1, 1, 9\\]\\)"),
    (lambda md, c: dict(seq_lens=md.seq_lens.view(3, 1)), "seq_lens must be 1-D \\[num_reqs\\], got shape \\[3, 1\\]"),
    (lambda md, c: dict(slot_mapping=md.slot_mapping.index_fill(0, torch.tensor([8]), 8 * BS)),
     "slot_mapping\\[8\\] = 128 out of range \\[0, 128\\)"),
    (lambda md, c: dict(slot_mapping=md.slot_mapping + (torch.arange(9) == 3).long()),
     "slot_mapping\\[3\\] = \\d+ but request 1 position 2 lives in slot"),
    (lambda md, c: dict(slot_mapping=torch.where(torch.arange(9) == 1, -1,
                                                 md.slot_mapping + (torch.arange(9) == 2).long())),
     "slot_mapping\\[2\\] = \\d+ but request 1 position 1 lives in slot"),   # checking goes on past a -1
    (lambda md, c: dict(block_table=torch.where(md.block_table == md.block_table[1, 0], 8, md.block_table)),
     "request 1: block ids \\[8\\] out of range \\[0, 8\\)"),
    (lambda md, c: dict(block_table=torch.cat([md.block_table, torch.full((3, 1), 8, dtype=torch.int32)], 1)),
     "request 0: block_table entries past its context \\[8\\] out of range \\[0, 8\\)"),
    (lambda md, c: dict(query_start_loc=torch.tensor([0, 1, 6], dtype=torch.int32)),
     "query_start_loc must have num_reqs \\+ 1 = 4 entries"),
    (lambda md, c: dict(query_start_loc=torch.tensor([0, 1, 6, 8], dtype=torch.int32)),
     "query_start_loc ends at 8 but slot_mapping has 9 tokens"),
    (lambda md, c: dict(seq_lens=torch.tensor([21, 4, 16], dtype=torch.int32)),
     "request 1: 5 new tokens but seq_lens\\[1\\] = 4"),
    (lambda md, c: dict(num_decodes=2), "\\(num_decodes, num_decode_tokens, num_prefills\\) = \\(2, 1, 2\\) but "
                                         "the batch has 3 requests \\(query lengths \\[1, 5, 3\\]\\)"),
    (lambda md, c: dict(num_decodes=2, num_decode_tokens=2, num_prefills=1),
     "\\(num_decodes, num_decode_tokens, num_prefills\\) = \\(2, 2, 1\\) but the first 2 requests' query "
     "lengths \\[1, 5\\] sum to 6"),
    (lambda md, c: dict(seq_lens=md.seq_lens.float()), "seq_lens must be int32 or int64, got torch.float32"),
    (lambda md, c: dict(block_table=md.block_table[:2]), "block_table must be \\[num_reqs=3, max_blocks\\]"),
])
def test_each_inconsistency_gives_clear_error(change, message):
    cache, _, _, md = _setup()
    bad = _broken(md, cache, **change(md, cache))
    with pytest.raises(MetadataError, match=message):
        bad.validate(cache, num_tokens=bad.slot_mapping.shape[0])


def test_token_count_mismatch():
    cache, _, _, md = _setup()
    with pytest.raises(MetadataError, match="hidden_states has 7 tokens but slot_mapping has 9"):
        md.validate(cache, num_tokens=7)


def test_builder_rejects_bad_requests():
    with pytest.raises(MetadataError, match="decode requests must come first"):
        build_metadata([(4, 0), (1, 3)], [[0], [1]], BS)
    with pytest.raises(MetadataError, match="request 0: 40 tokens need 3 blocks of 16, its block table has 2"):
        build_metadata([(40, 0)], [[0, 1]], BS)
    with pytest.raises(MetadataError, match="need new_tokens >= 1"):
        build_metadata([(0, 3)], [[0]], BS)


def test_multi_token_decodes():
    """Decode requests of 1 to MAX_DECODE_TOKENS new tokens (draft tokens to verify), first in the batch."""
    cache = PagedLatentCache.allocate(V3_TINY, 16, BS, shuffle_blocks=True)
    requests = [(4, 20), (1, 10), (3, 7), (5, 0)]
    rows = [cache.allocator.grow([], n + c, BS) for n, c in requests]
    md = build_metadata(requests, rows, BS, decode_tokens=4)
    md.validate(cache, num_tokens=13)
    assert (md.num_decodes, md.num_decode_tokens, md.num_prefills, md.phase) == (3, 8, 1, "multi_mixed")
    assert md.multi_token_decodes
    only = build_metadata(requests[:3], rows[:3], BS, decode_tokens=4)
    assert (only.num_decodes, only.num_decode_tokens, only.phase) == (3, 8, "multi_decode")
    # decode_tokens=1 (the default): the same requests are prefills after the one-token decode... which
    # must come first
    with pytest.raises(MetadataError, match="decode requests must come first"):
        build_metadata(requests, rows, BS)
    assert build_metadata(requests[1:2], rows[1:2], BS).phase == "decode"
    # a request of at most decode_tokens new tokens but no cache is a prompt, hence a prefill
    assert build_metadata([(3, 0)], [rows[3]], BS, decode_tokens=4).phase == "prefill"
    for bad in (0, 17, True, 2.0):
        with pytest.raises(MetadataError, match="decode_tokens must be an int in 1..16"):
            build_metadata(requests, rows, BS, decode_tokens=bad)
    long = build_metadata([(17, 3)], [cache.allocator.grow([], 20, BS)], BS)
    with pytest.raises(MetadataError, match="decode request 0 has 17 new tokens; a decode request has 1 to 16"):
        dataclasses.replace(long, num_decodes=1, num_decode_tokens=17, num_prefills=0).validate()


@pytest.mark.parametrize("make_module", ["plain", "lowered"])
def test_rejected_call_writes_nothing(make_module):
    layer = randomize(MLAAttention(V3_TINY))
    module = layer if make_module == "plain" else lower(layer, block_size=BS)
    cache, requests, _, md = _setup()
    before = cache.clone()
    x = torch.randn(9, V3_TINY.hidden_size)
    bad_calls = [
        (x[:8], positions_for(requests), md, "positions must be \\[8\\]"),
        (x, positions_for(requests)[:8], md, "positions must be \\[9\\]"),
        (x, positions_for(requests), dataclasses.replace(md, slot_mapping=md.slot_mapping[:8]),
         "slot_mapping must be \\[9\\]"),
        (x.double(), positions_for(requests), md, "hidden_states is torch.float64"),
        (x[:, :10], positions_for(requests), md, "hidden_states must be \\[num_tokens, 64\\]"),
    ]
    for hidden, positions, metadata, message in bad_calls:
        with pytest.raises(ValueError, match=message):
            module(hidden, positions, cache, metadata)
        assert torch.equal(cache.latent, before.latent) and torch.equal(cache.rope, before.rope)
    # a bad cache layout is rejected before anything is written, too
    wrong = PagedLatentCache(cache.latent[..., :10].contiguous(), cache.rope)
    with pytest.raises(ValueError, match="kv_cache.latent must be \\[num_blocks, block_size, 1, 48\\]"):
        module(x, positions_for(requests), wrong, md)
    assert torch.equal(cache.latent, before.latent)


def test_edges_of_the_valid_range_pass():
    """Block 0 and slot 0 are valid (when no block is reserved), a context may fill its blocks
    exactly, and block size 1 works."""
    cache = PagedLatentCache.allocate(V3_TINY, 4, BS)
    md = build_metadata([(1, 15), (16, 0)], [[0], [3]], BS)
    assert md.slot_mapping[0].item() == 15 and md.seq_lens.tolist() == [16, 16]
    md.validate(cache, num_tokens=17)
    build_metadata([(3, 0)], [[0]], BS).validate(cache)      # writes slot 0
    tiny = PagedLatentCache.allocate(V3_TINY, 1, 1)
    one = build_metadata([(1, 0)], [[0]], 1)
    assert one.slot_mapping.tolist() == [0]
    one.validate(tiny)


def test_reserved_block_may_not_be_in_a_context():
    cache = PagedLatentCache.allocate(V3_TINY, 4, BS)
    md = build_metadata([(1, 3), (2, 0)], [[2], [1]], BS)
    md.validate(cache, reserved_block=0)                      # no request holds block 0
    with pytest.raises(MetadataError, match="request 1: its context holds block 1, the padding block"):
        md.validate(cache, reserved_block=1)


def test_two_tokens_one_slot_is_rejected():
    """Two requests whose block tables share a block write the same slots."""
    cache = PagedLatentCache.allocate(V3_TINY, 8, BS)
    md = build_metadata([(3, 0), (3, 0)], [[5], [5]], BS)
    with pytest.raises(MetadataError, match="slot_mapping\\[3\\] = 80 is also slot_mapping\\[0\\]: two tokens"):
        md.validate(cache)
    later = build_metadata([(1, 1), (2, 0)], [[5], [5]], BS)   # the prefill's second token meets the decode's
    with pytest.raises(MetadataError, match="slot_mapping\\[2\\] = 81 is also slot_mapping\\[0\\]"):
        later.validate(cache)
    second = build_metadata([(2, 0), (2, 1)], [[5], [5]], BS)  # the first writer is a prefill's second token
    with pytest.raises(MetadataError, match="slot_mapping\\[2\\] = 81 is also slot_mapping\\[1\\]"):
        second.validate(cache)


def test_builder_dtypes_padding_and_device():
    md = build_metadata([(1, 3), (1, 7), (2, 20)], [[3], [4], [5, 6]], BS)
    assert (md.num_decodes, md.num_decode_tokens, md.num_prefills) == (2, 2, 1)
    assert md.block_table.tolist() == [[3, 0], [4, 0], [5, 6]]    # ragged rows padded with block 0
    assert (md.slot_mapping.dtype, md.block_table.dtype, md.seq_lens.dtype, md.query_start_loc.dtype) == \
        (torch.int64, torch.int32, torch.int32, torch.int32)
    decodes = build_metadata([(1, 3), (1, 7)], [[3], [4]], BS)  # decodes only
    assert (decodes.num_decodes, decodes.num_prefills, decodes.block_table.shape) == (2, 0, (2, 1))
    empty = build_metadata([], [], BS)
    assert empty.slot_mapping.dtype == torch.int64 and empty.block_table.shape == (0, 1) and empty.num_reqs == 0
    meta = build_metadata([(1, 3)], [[3]], BS, device="meta")
    tensors = (meta.slot_mapping, meta.block_table, meta.seq_lens, meta.query_start_loc)
    assert {t.device.type for t in tensors} == {"meta"}


@pytest.mark.parametrize("request_, message", [
    ((0, 3), "request 0: \\(new_tokens, cached_tokens\\) = \\(0, 3\\)"),
    ((2, -1), "= \\(2, -1\\)"), ((True, 0), "= \\(True, 0\\)"), ((1, True), "= \\(1, True\\)"),
    ((2.0, 0), "= \\(2.0, 0\\)"), ((1, 0.5), "= \\(1, 0.5\\)"),
])
def test_builder_and_positions_reject_bad_requests(request_, message):
    with pytest.raises(MetadataError, match=message):
        build_metadata([request_], [[1, 2]], BS)
    with pytest.raises(MetadataError, match=message):
        positions_for([request_])


@pytest.mark.parametrize("row", [[-1], [1.5], [True]])
def test_builder_rejects_bad_block_ids(row):
    with pytest.raises(MetadataError, match=f"request 0: block ids must be non-negative ints \\(physical block "
                                            f"numbers\\), got \\[{row[0]}\\] in its block table \\[{row[0]}\\]"):
        build_metadata([(1, 0)], [row], BS)


def test_builder_rejects_mismatched_lists_and_block_size():
    with pytest.raises(MetadataError, match="2 requests but 1 block table rows"):
        build_metadata([(1, 0), (1, 0)], [[1]], BS)
    with pytest.raises(MetadataError, match="block_size must be >= 1, got 0"):
        build_metadata([(1, 0)], [[1]], 0)


def test_positions_for():
    assert positions_for([(1, 5), (3, 0), (2, 7)]).tolist() == [5, 0, 1, 2, 7, 8]
    empty = positions_for([])
    assert empty.shape == (0,) and empty.dtype == torch.int64
    assert positions_for([(2, 1)], device="meta").device.type == "meta"
    assert positions_for([], device="meta").device.type == "meta"

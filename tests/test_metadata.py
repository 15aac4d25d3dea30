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
     "decode requests must come first"),
    (lambda md, c: dict(query_start_loc=torch.tensor([0, 1, 6], dtype=torch.int32)),
     "query_start_loc must have num_reqs \\+ 1 = 4 entries"),
    (lambda md, c: dict(query_start_loc=torch.tensor([0, 1, 6, 8], dtype=torch.int32)),
     "query_start_loc ends at 8 but slot_mapping has 9 tokens"),
    (lambda md, c: dict(seq_lens=torch.tensor([21, 4, 16], dtype=torch.int32)),
     "request 1: 5 new tokens but seq_lens\\[1\\] = 4"),
    (lambda md, c: dict(num_decodes=2), "\\(num_decodes, num_decode_tokens, num_prefills\\) = \\(2, 1, 2\\)"),
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

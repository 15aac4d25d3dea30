"""Slot -1 (vLLM's "write nothing", e.g. for padding tokens) through each target's cache writer.

A mixed batch in which a decode token and a prefill token have slot -1, over caches with random
contents: every byte of the caches but the written slots keeps its value, on the plain layer and
on every target, and no target writes the caches' last slot (where a -1 used as an index lands).
"""
import pytest
import torch
from conftest import V2_LITE_NPU, V3_TINY, changed_rows, randomize

from mla_graph import MLAAttention, lower
from mla_graph.checking import LAYER_TOLERANCES, PHASE_BATCHES, random_batch

EMPTY = (1, 5)   # token 1: request 1's decode token; token 5: request 2's fourth prefill token


@pytest.mark.parametrize("config, dtype, target", [(V3_TINY, torch.float32, "reference"),
                                                   (V3_TINY, torch.float32, "npu"),
                                                   (V2_LITE_NPU, torch.bfloat16, "npu")],
                         ids=["reference", "npu-fallbacks-fp32", "npu-kernels-bf16"])
def test_slot_minus_one_writes_nothing(config, dtype, target):
    layer = randomize(MLAAttention(config, dtype=dtype), std=0.02 if config is V2_LITE_NPU else 0.2)
    lowered = lower(layer, target, ["mixed"], block_size=16)
    batch = random_batch(layer, PHASE_BATCHES["mixed"], block_size=16, seed=3)
    md = batch.metadata
    md.slot_mapping[list(EMPTY)] = -1
    written = [s for s in md.slot_mapping.tolist() if s != -1]
    last = batch.cache.num_blocks * batch.cache.block_size - 1
    assert last not in written   # else a stray write to it would not show
    caches = {"plain": batch.cache.clone(), target: batch.cache.clone()}
    with torch.no_grad():
        expected = layer(batch.hidden_states, batch.positions, caches["plain"], md)
        actual = lowered(batch.hidden_states, batch.positions, caches[target], md)
    rtol, atol = LAYER_TOLERANCES[dtype]
    # a token with slot -1 finds the old contents at its own position: the same on both sides
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
    for part in ("latent", "rope"):
        before = getattr(batch.cache, part)
        for name, cache in caches.items():
            after = getattr(cache, part)
            stray = sorted(set(changed_rows(before, after)) - set(written))
            assert not stray, f"{name}: {part} slots {stray} changed, but only {sorted(written)} were written"
            flat = after.view(-1, after.shape[-1])
            torch.testing.assert_close(flat[written], getattr(caches["plain"], part).view(-1, after.shape[-1])[written],
                                       rtol=rtol, atol=atol)

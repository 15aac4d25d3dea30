"""Converted Hugging Face models under torch.compile(backend="mla_graph"): greedy tokens equal the
unconverted model's, on every target, at batch sizes 1, 2 and 3 (1 is the size Dynamo always
specialises, 2 a graph-mode bucket, 3 not one), for the dense and the MoE model.

This is where a torchair target once dropped attention at batch 1 without an error: the whole-step
inliner's dead-code elimination erased the HF adapter's `out.index_copy_(...)`. The oracle is
transformers' own model (DeepseekV3Attention, DynamicCache), run eagerly.
"""
import copy

import pytest
import torch
from test_hf import first_difference, padded_batch, tiny_hf

from mla_graph.runtime.whole_step import compiled_steps
from mla_graph.hf import convert

NEW_TOKENS = 50
PROMPTS = [11, 5, 8, 9, 7]
BATCHES = (1, 2, 3)
TARGETS = ["reference", "cpu", "npu", "torchair", "torchair-multistream"]


def greedy(model, batch):
    ids, mask = padded_batch(PROMPTS[:batch])
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                              do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def oracle():
    """transformers' own tokens, per (variant, batch)."""
    found = {}

    def tokens(variant, batch):
        if (variant, batch) not in found:
            found[variant, batch] = greedy(tiny_hf(variant), batch)
        return found[variant, batch]
    return tokens


@pytest.mark.parametrize("variant", ["dense", "moe"])
@pytest.mark.parametrize("target", TARGETS)
def test_compiled_converted_model_generates_the_unconverted_tokens(target, variant, oracle):
    model = convert(copy.deepcopy(tiny_hf(variant)), target, block_size=16)
    eager_forward = model.forward
    for batch in BATCHES:   # a fresh compile per batch: a first batch of 1 is the one Dynamo specialises
        torch._dynamo.reset()
        before = {s.serial for s in compiled_steps()}
        model.forward = torch.compile(eager_forward, backend="mla_graph",
                                      options={"target": target, "inner_backend": "eager"})
        got, want = greedy(model, batch), oracle(variant, batch)
        assert torch.equal(got, want), f"batch {batch}: {first_difference(got, want)}"
        if target.startswith("torchair"):
            # the decode steps ran as whole-step graphs at this batch size, not layer by layer
            runs = [size for s in compiled_steps() if s.serial not in before for size in s.buckets_run]
            assert runs == [batch] * (NEW_TOKENS - 1), runs
    torch._dynamo.reset()

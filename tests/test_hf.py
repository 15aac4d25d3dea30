"""Hugging Face DeepSeek models converted with mla_graph.hf: generate() unchanged, same tokens.

The oracle is the same model unconverted (transformers' own DeepseekV3Attention and DynamicCache).
Models are tiny random-weight DeepSeek-V3 configs (tests/tiny_models.py: yarn rope with mscale !=
mscale_all_dim, random norm gammas), built in memory: dense with q_lora, MoE without q_lora.
"""
from __future__ import annotations

import copy

import pytest
import torch

from tiny_models import VARIANTS, hf_config, randomize_

from mla_graph.hf import ConversionError, MLAForHF, PagedMLACache, convert  # noqa: E402  (needs transformers: the test extra)

BLOCK = 16
NEW_TOKENS = 40   # prompts of 5..11 tokens + 40 new: 3 to 4 cache blocks per row


def tiny_hf(variant: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    fields = hf_config(VARIANTS[variant])
    config = DeepseekV3Config(**{k: v for k, v in fields.items() if k not in ("architectures", "model_type")})
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(config).to(torch.float32).eval()
    randomize_(model, seed)
    return model.to(dtype)


def padded_batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of the given lengths (generate's convention for decoder-only models)."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, width - n:] = torch.randint(2, 1000, (n,), generator=gen)
        mask[b, width - n:] = 1
    return ids, mask


def generate(model, ids, mask, **kwargs):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                              return_dict_in_generate=True, output_logits=True, pad_token_id=0, **kwargs)


def first_difference(a: torch.Tensor, b: torch.Tensor) -> str:
    rows = [(r, int((a[r] != b[r]).nonzero()[0])) for r in range(a.shape[0]) if not torch.equal(a[r], b[r])]
    return ", ".join(f"row {r} from column {c}" for r, c in rows)


_ORACLE: dict = {}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("target", ["reference", "cpu", "npu"])
def test_greedy_generate_equals_the_unconverted_model(variant, target):
    """fp32, a batch of prompts of different lengths (left padding), 40 new tokens past several
    cache blocks: the converted model's tokens equal transformers' own, logits to fp32 precision."""
    ids, mask = padded_batch([11, 5, 8])
    if variant not in _ORACLE:   # transformers' own tokens, once per variant
        _ORACLE[variant] = generate(tiny_hf(variant), ids, mask, do_sample=False)
    want = _ORACLE[variant]
    converted = convert(tiny_hf(variant), target, block_size=BLOCK)
    got = generate(converted, ids, mask, do_sample=False)
    assert torch.equal(got.sequences, want.sequences), first_difference(got.sequences, want.sequences)
    logits_got, logits_want = torch.stack(got.logits), torch.stack(want.logits)
    scale = float(logits_want.abs().max())
    assert float((logits_got - logits_want).abs().max()) <= 1e-4 * scale


def test_sampling_equals_the_unconverted_model():
    """Sampling with one seed: the same logits give the same samples."""
    model = tiny_hf("dense")
    oracle = copy.deepcopy(model)
    ids, mask = padded_batch([9, 4], seed=1)
    torch.manual_seed(123)
    want = generate(oracle, ids, mask, do_sample=True, temperature=0.8, top_k=20)
    converted = convert(model, "reference", block_size=BLOCK)
    torch.manual_seed(123)
    got = generate(converted, ids, mask, do_sample=True, temperature=0.8, top_k=20)
    assert torch.equal(got.sequences, want.sequences), first_difference(got.sequences, want.sequences)


def test_bf16_logits_within_tolerance():
    """bf16: per-token logits of the converted model within 3% of the largest logit of the
    unconverted bf16 model's, teacher-forced on the same tokens (bf16 keeps 8 bits: each of the
    ~10 reductions of a layer may round differently in another order)."""
    model = tiny_hf("dense", torch.bfloat16)
    oracle = copy.deepcopy(model)
    ids, mask = padded_batch([11, 6])
    want = generate(oracle, ids, mask, do_sample=False)
    converted = convert(model, "reference", block_size=BLOCK)
    # teacher-forced: the converted model is fed the oracle's tokens, one step per token
    cache = PagedMLACache.for_model(converted, batch_size=2, max_tokens=ids.shape[1] + NEW_TOKENS)
    sequence, full_mask = want.sequences, torch.cat([mask, torch.ones(2, NEW_TOKENS, dtype=mask.dtype)], 1)
    worst = 0.0
    with torch.no_grad():
        start = ids.shape[1]
        out = converted(sequence[:, :start], attention_mask=full_mask[:, :start], cache=cache, use_cache=True)
        steps = [out.logits[:, -1]]
        for t in range(start, sequence.shape[1] - 1):
            out = converted(sequence[:, t:t + 1], attention_mask=full_mask[:, :t + 1], cache=cache, use_cache=True)
            steps.append(out.logits[:, -1])
    for got, expected in zip(steps, want.logits):
        worst = max(worst, float((got.float() - expected.float()).abs().max() / expected.float().abs().max()))
    print(f"bf16: largest per-step logit difference {worst:.4f} of the step's largest logit")
    assert worst <= 0.03


def test_weights_are_shared_not_copied():
    model = tiny_hf("dense")
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    converted = convert(model, "npu", block_size=BLOCK)
    after = {k: v.data_ptr() for k, v in converted.state_dict().items()}
    assert after == before, "conversion changed the state_dict's keys or copied a tensor"
    attention = converted.model.layers[0].self_attn
    assert isinstance(attention, MLAForHF)
    assert attention.source.kv_b_proj.weight is attention.kv_b_proj.weight
    # a later load_state_dict reaches the lowered module (npu: its absorbed W_UK/W_UV are recut)
    fresh = tiny_hf("dense", seed=7)
    oracle = copy.deepcopy(fresh)
    converted.load_state_dict(fresh.state_dict())
    ids, mask = padded_batch([7, 3])
    assert torch.equal(generate(converted, ids, mask, do_sample=False).sequences,
                       generate(oracle, ids, mask, do_sample=False).sequences)


def test_bad_uses_say_what_to_do():
    model = tiny_hf("dense")
    converted = convert(model, "reference", block_size=BLOCK)
    with pytest.raises(ConversionError, match="converted already"):
        convert(converted)
    ids, mask = padded_batch([4, 4])
    from transformers import DynamicCache
    with pytest.raises(TypeError, match="needs a PagedMLACache.*generate"):
        converted(ids, attention_mask=mask, cache=DynamicCache(config=converted.config), use_cache=True)
    with pytest.raises(NotImplementedError, match="beam search"):
        converted.generate(ids, attention_mask=mask, max_new_tokens=3, num_beams=2, pad_token_id=0)
    # generate(use_cache=False) was called through generate(): the message names use_cache instead
    with pytest.raises(ValueError, match=r"use_cache=False.*needs use_cache=True.*leave use_cache out"):
        converted.generate(ids, attention_mask=mask, max_new_tokens=3, use_cache=False, pad_token_id=0)
    with pytest.raises(TypeError, match=r"without a cache.*use_cache=True.*PagedMLACache.for_model"):
        converted(ids, attention_mask=mask, use_cache=False)
    with pytest.raises(ConversionError, match="no decoder layers.*DeepseekV3ForCausalLM"):
        convert(torch.nn.Module())
    llama_like = tiny_hf("dense")
    llama_like.model.layers[1].self_attn = torch.nn.Identity()
    with pytest.raises(ConversionError, match="found 1: Identity"):
        convert(llama_like)


def test_backend_on_an_unconverted_model_says_what_to_do():
    """torch.compile(backend="mla_graph") on transformers' own DeepSeek: it would lower nothing, so
    it says so and names the fix, instead of silently compiling the model unchanged."""
    model = tiny_hf("dense")
    ids, mask = padded_batch([5, 5])
    compiled = torch.compile(model, backend="mla_graph", options={"target": "reference", "inner_backend": "eager"})
    torch._dynamo.reset()
    with pytest.raises(Exception, match="DeepseekV3Attention module.*mla_graph.hf.convert") as info:
        with torch.no_grad():
            compiled(ids, attention_mask=mask)
    torch._dynamo.reset()
    assert "would lower nothing" in str(info.value)


def test_readme_example_runs():
    """The README's Hugging Face example, as written."""
    import pathlib
    import re

    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Hugging Face models", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md (Hugging Face models)", "exec"), scope)
    assert tuple(scope["out"].shape) == (2, 5 + 40)
    assert isinstance(scope["model"].model.layers[0].self_attn, MLAForHF)


def test_a_dtype_change_after_convert_names_the_fix():
    """model.to(bf16) after convert: the shared weights are bf16, the lowering was made for fp32;
    the error says so and what to do (convert after .to()), and converting in that order works."""
    ids, mask = padded_batch([4, 6])
    converted = convert(tiny_hf("dense"), "cpu", block_size=BLOCK).to(torch.bfloat16)
    with pytest.raises(ConversionError, match=r"weights are torch.bfloat16 but convert\(\) lowered it for "
                                              r"torch.float32.*convert\(model.to\(torch.bfloat16\), target\)"):
        generate(converted, ids, mask, do_sample=False)
    in_order = convert(tiny_hf("dense").to(torch.bfloat16), "cpu", block_size=BLOCK)
    assert generate(in_order, ids, mask, do_sample=False).sequences.shape == (2, 6 + NEW_TOKENS)

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


def _assisted(model, ids, **kwargs):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, min_new_tokens=24,
                              do_sample=False, pad_token_id=0, **kwargs)


def _spy_crops(monkeypatch) -> list[int]:
    calls = []
    original = PagedMLACache.crop

    def crop(self, tokens_to_remove):
        calls.append(tokens_to_remove)
        return original(self, tokens_to_remove)
    monkeypatch.setattr(PagedMLACache, "crop", crop)
    return calls


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_prompt_lookup_generate_equals_plain_greedy(target, monkeypatch):
    """generate(prompt_lookup_num_tokens=4): drafts copied from the prompt's n-grams are verified in one
    forward of several tokens per row, and the rejected ones cropped from the cache; the tokens equal
    plain greedy of the unconverted model. The prompt repeats an n-gram so drafts are proposed (the
    random model rejects most of them: crop takes tokens back)."""
    gen = torch.Generator().manual_seed(3)
    phrase = torch.randint(2, 1000, (6,), generator=gen)
    ids = torch.cat([phrase, torch.randint(2, 1000, (5,), generator=gen), phrase, phrase[:3]]).view(1, -1)
    want = _assisted(tiny_hf("dense"), ids)
    crops = _spy_crops(monkeypatch)
    got = _assisted(convert(tiny_hf("dense"), target, block_size=BLOCK), ids, prompt_lookup_num_tokens=4)
    assert torch.equal(got, want), first_difference(got, want)
    assert any(c < 0 for c in crops), f"no draft was rejected and cropped: {crops}"


def test_assistant_model_generate_equals_plain_greedy(monkeypatch):
    """An assistant (the unconverted model itself, so its drafts are the greedy tokens and are
    accepted) drafting several tokens a step: the converted model verifies them several at a time
    over its paged cache; the tokens equal plain greedy."""
    ids = padded_batch([9])[0]
    want = _assisted(tiny_hf("dense"), ids)
    crops = _spy_crops(monkeypatch)
    got = _assisted(convert(tiny_hf("dense"), "cpu", block_size=BLOCK), ids, assistant_model=tiny_hf("dense"))
    assert torch.equal(got, want), first_difference(got, want)
    # one verifying forward per crop: fewer forwards than tokens, so drafts were accepted several at a time
    assert 0 < len(crops) < 24 and all(c <= 0 for c in crops), crops


def test_crop_gives_back_the_rejected_tokens_slots_and_blocks():
    """Four steps of one row (11 prompt tokens, then 1, then 6 drafts), crop(-5): the row holds 13
    tokens in one block, the block it took for the drafts is free again, and the next step writes
    its token in slot 13 of the row's first block: where it would have gone without the drafts."""
    from mla_graph.config import MLAConfig
    config = MLAConfig.preset("deepseek-v2-lite").replace(hidden_size=64, num_heads=2, kv_lora_rank=16,
                                                        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    cache = PagedMLACache([config], batch_size=1, max_tokens=64, block_size=BLOCK, dtype=torch.float32)
    free_at_start = cache.allocator.num_free
    for n in (11, 1, 6):
        cache.begin_step(n, None)
        cache.end_step()
    assert cache.context == [18] and len(cache.rows[0]) == 2 and cache.columns == 18
    cache.crop(-5)
    assert cache.context == [13] and cache.columns == 13 and len(cache.rows[0]) == 1
    assert cache.allocator.num_free == free_at_start - 1
    step = cache.begin_step(1, None)
    assert step.metadata.slot_mapping.tolist() == [cache.rows[0][0] * BLOCK + 13]
    assert step.positions.tolist() == [13]
    cache.end_step()
    cache.crop(0)                               # nothing to remove: unchanged
    assert cache.context == [14]
    cache.crop(10)                              # transformers 4's form: the length to keep
    assert cache.context == [10] and cache.columns == 10
    with pytest.raises(ValueError, match=r"crop\(-11\): the cache holds 10 columns"):
        cache.crop(-11)
    with pytest.raises(ValueError, match="crop takes an int"):
        cache.crop(2.5)


def test_crop_counts_each_rows_own_tokens_under_left_padding():
    """Two rows, the second left-padded by 3: cropping the last 2 columns takes 2 tokens from each row
    (new columns are tokens in every row), never a padding column."""
    from mla_graph.config import MLAConfig
    config = MLAConfig.preset("deepseek-v2-lite").replace(hidden_size=64, num_heads=2, kv_lora_rank=16,
                                                        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    cache = PagedMLACache([config], batch_size=2, max_tokens=64, block_size=BLOCK, dtype=torch.float32)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
    cache.begin_step(5, mask)
    cache.end_step()
    for _ in range(3):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        cache.begin_step(1, mask)
        cache.end_step()
    assert cache.context == [8, 5]
    cache.crop(-2)
    assert cache.context == [6, 3] and cache.columns == 6
    cache.crop(-5)                              # into the prompt: row 1's padding columns hold no tokens
    assert cache.context == [1, 0]

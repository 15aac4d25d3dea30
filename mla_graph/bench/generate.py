"""5. End-to-end greedy `generate` of a tiny Hugging Face DeepSeek-V3 model: converted to the cpu target
(mla_graph.hf.convert) vs unconverted, same weights, same long prompt."""
from __future__ import annotations

import copy
import math
import time
from typing import Callable

import torch

from .settings import Settings, summary

# The "dense" variant of tests/tiny_models.py (DeepSeek-V3-like attention: q_lora, yarn with mscale !=
# mscale_all_dim, the 512 + 64 latent), with room for a long prompt.
TINY_DEEPSEEK_V3 = {
    "vocab_size": 1024, "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 64,
    "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 32, "v_head_dim": 32,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                        "original_max_position_embeddings": 128, "beta_fast": 32, "beta_slow": 1,
                        "mscale": 1.0, "mscale_all_dim": 0.8},
    "rope_interleave": True, "first_k_dense_replace": 2, "n_routed_experts": 8, "num_experts_per_tok": 2,
    "n_shared_experts": 1, "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5,
    "norm_topk_prob": True, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
    "pad_token_id": None,
}


def tiny_model(seed: int = 0) -> torch.nn.Module:
    """TINY_DEEPSEEK_V3 with seeded random weights (random_deepseek)."""
    return random_deepseek(TINY_DEEPSEEK_V3, seed)


def random_deepseek(fields: dict, seed: int = 0) -> torch.nn.Module:
    """A float32 DeepseekV3ForCausalLM of config `fields` with seeded random weights and O(1)
    activations, as tests/tiny_models.randomize_ makes them: linears N(0, 1/fan_in), embeddings
    N(0, 1), norm gammas 1 + N(0, 0.3)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**fields)).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            noise = torch.randn(tensor.shape, generator=gen)
            if tensor.dim() == 1:
                value = 1.0 + 0.3 * noise
            elif "embed_tokens" in name:
                value = noise
            else:
                value = noise / math.sqrt(tensor.shape[-1])
            tensor.copy_(value.to(tensor.dtype))
    return model


def generate_throughput(s: Settings, log: Callable[[str], None]) -> dict:
    """Greedy generate of s.generate_new_tokens after an s.generate_prompt_tokens prompt (batch 1,
    float32), timed whole and with one new token only (prefill); decode tokens/s is the rest."""
    from ..hf import convert

    prompt_len, new = s.generate_prompt_tokens, s.generate_new_tokens
    vocab = TINY_DEEPSEEK_V3["vocab_size"]
    ids = torch.randint(2, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    unconverted = tiny_model()
    models = {"hf": unconverted, "cpu": convert(copy.deepcopy(unconverted), "cpu", block_size=s.block_size)}
    out = {"model": "tiny DeepSeek-V3 (random weights)", "config": dict(TINY_DEEPSEEK_V3), "dtype": "float32",
           "batch": 1, "prompt_tokens": prompt_len, "new_tokens": new, "block_size": s.block_size, "models": {}}
    tokens = {}
    for name, model in models.items():
        def run(n: int, model=model) -> torch.Tensor:
            with torch.no_grad():
                return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, pad_token_id=0)
        tokens[name] = run(new)[0, prompt_len:]                  # also the warm-up
        whole, prefill = [], []
        for _ in range(s.repeats):
            start = time.perf_counter()
            run(new)
            whole.append(time.perf_counter() - start)
            start = time.perf_counter()
            run(1)
            prefill.append(time.perf_counter() - start)
        w, p = summary(whole), summary(prefill)
        out["models"][name] = {"seconds": w, "prefill_seconds": p, "tokens_per_second": new / w["median"],
                               "decode_tokens_per_second": (new - 1) / max(w["median"] - p["median"], 1e-9)}
        log(f"  generate {name}: {new} tokens after {prompt_len} in {w['median']:.2f} s "
            f"({out['models'][name]['tokens_per_second']:.1f} tokens/s; prefill {p['median']:.2f} s, decode "
            f"{out['models'][name]['decode_tokens_per_second']:.1f} tokens/s)")
    out["tokens_equal"] = bool(torch.equal(tokens["cpu"], tokens["hf"]))
    out["tokens"] = {name: t.tolist() for name, t in tokens.items()}
    rates = {name: v["tokens_per_second"] for name, v in out["models"].items()}
    out["speedup_tokens_per_second"] = rates["cpu"] / rates["hf"]
    log(f"  greedy tokens equal: {out['tokens_equal']}")
    return out

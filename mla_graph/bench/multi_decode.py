"""7. Multi-token decode (speculative decoding's verification): every request verifies 1, 2, 4, 8 or 16
new tokens over its cached context in one step. The cpu target (its decode graph for one token, its
multi_decode graph for more) against Hugging Face's DeepseekV3Attention over the same cache, and a
hand-written absorbed core (no projections, no cache write), per step and per token."""
from __future__ import annotations

from dataclasses import asdict
from typing import Callable

import torch

from ..attention import MLAAttention
from ..lowering import lower
from .decode_step import (CORE_AGREEMENT_EPS, HF_AGREEMENT_EPS, DisagreesWithHuggingFace, _random_norm_weights,
                          _relative_diff, agreement_with_hf, decode_batch, hf_deepseek_attention)
from .settings import Settings, dtype_name, fmt, timed

TOKENS_PER_REQUEST = (1, 2, 4, 8, 16)


def absorbed_core_multi(q: torch.Tensor, latent_cache: torch.Tensor, rope_cache: torch.Tensor,
                        block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """The hand-written core for t new tokens per request (bench.decode_step.absorbed_core at t = 1):
    q [B, t, N, L+R] absorbed; gather every block-table row, one bmm for all t*N query rows, the causal
    limit of each token (token i of t sees keys j <= seq_len - t + i) as a mask, float32 softmax, bmm.
    Returns [B, t, N, L]."""
    B, t, N, D = q.shape
    L = latent_cache.shape[-1]
    rows = block_table.long()
    k = torch.cat([latent_cache[rows], rope_cache[rows]], -1).view(B, -1, D)          # [B, S, L+R]
    scores = torch.bmm(q.view(B, t * N, D), k.transpose(1, 2)).float() * scale         # [B, t*N, S]
    limit = (seq_lens.view(-1, 1) - t + torch.arange(t).view(1, -1)).repeat_interleave(N, 1)   # [B, t*N]
    hidden = torch.arange(k.shape[1]).view(1, 1, -1) > limit.unsqueeze(-1)
    probs = torch.softmax(scores.masked_fill_(hidden, float("-inf")), dim=-1)
    return torch.bmm(probs.to(q.dtype), k[..., :L]).view(B, t, N, L)


def textbook_core_multi(q: torch.Tensor, latent_cache: torch.Tensor, rope_cache: torch.Tensor,
                        block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """The same in float64, one token at a time over exactly the cache rows it sees."""
    B, t, N, _ = q.shape
    L, bs = latent_cache.shape[-1], latent_cache.shape[1]
    out = torch.empty(B, t, N, L, dtype=torch.float64)
    for b, seq_len in enumerate(seq_lens.tolist()):
        for i in range(t):
            visible = seq_len - t + i + 1
            slots = [int(block_table[b, j // bs]) * bs + j % bs for j in range(visible)]
            c = latent_cache.reshape(-1, L)[slots].double()
            kr = rope_cache.reshape(-1, rope_cache.shape[-1])[slots].double()
            weights = torch.softmax(scale * (q[b, i].double() @ torch.cat([c, kr], -1).T), dim=-1)
            out[b, i] = weights @ c
    return out


def multi_decode(s: Settings, log: Callable[[str], None]) -> dict:
    """Times the cpu target, Hugging Face and the core at each tokens-per-request count (batch
    s.batches[-1], context s.contexts[1], the first of s.decode_dtypes) and checks each: the layer
    against Hugging Face (agreement_with_hf), the core against textbook_core_multi."""
    from transformers import DynamicCache

    config, dtype = s.decode_config, s.decode_dtypes[0]
    batch, context = s.batches[-1], s.contexts[min(1, len(s.contexts) - 1)]
    torch.manual_seed(0)
    hf, rotary = hf_deepseek_attention(config, dtype)
    _random_norm_weights(hf, torch.Generator().manual_seed(0))
    layer = MLAAttention(config, dtype=dtype).requires_grad_(False)
    layer.load_state_dict(hf.state_dict())
    ours = lower(layer, "cpu", ["decode", "multi_decode"], block_size=s.block_size)
    out = {"config": asdict(config) | {"name": config.name}, "dtype": dtype_name(dtype), "batch": batch,
           "context": context, "target": "cpu", "cases": []}
    for t in TOKENS_PER_REQUEST:
        b = decode_batch(config, batch=batch, context=context, dtype=dtype, block_size=s.block_size, new_tokens=t)
        md = b.metadata
        blocks = md.block_table.long()
        kv_nope = b.cache.latent[blocks].reshape(batch, -1, config.kv_lora_rank)[:, :context].unsqueeze(1)
        k_rot = b.cache.rope[blocks].reshape(batch, -1, config.qk_rope_head_dim)[:, :context].unsqueeze(1)
        x = b.hidden.view(batch, t, -1)
        cos_sin = rotary(x, b.positions.view(batch, t))
        # token i of t sees the context and new tokens 0..i: Hugging Face is given the mask (its sdpa
        # would align a causal mask top-left for t > 1)
        hidden_keys = torch.arange(context + t).view(1, -1) > torch.arange(t).view(-1, 1) + context
        mask = torch.zeros(t, context + t, dtype=dtype).masked_fill_(hidden_keys, torch.finfo(dtype).min)
        q_absorbed = torch.randn(batch, t, config.num_heads, config.kv_lora_rank + config.qk_rope_head_dim,
                                 generator=torch.Generator().manual_seed(1)).to(dtype)
        core_args = (q_absorbed, b.cache.latent, b.cache.rope, md.block_table, md.seq_lens, layer.scale)

        def hf_call() -> torch.Tensor:
            hf_cache = DynamicCache()
            hf_cache.update(kv_nope, k_rot, 0)
            return hf(x, cos_sin, mask.expand(batch, 1, t, context + t), cache=hf_cache)[0].reshape(batch * t, -1)

        calls = {"hf": hf_call, "cpu": lambda: ours(*b.args()), "core": lambda: absorbed_core_multi(*core_args)}
        results, case = {}, {"tokens_per_request": t, "phase": md.phase, "impls": {}}
        with torch.no_grad():
            for name, fn in calls.items():
                results[name] = fn()                                    # warm-up, and the output compared
                seconds = timed(fn, s.repeats)
                case["impls"][name] = {"seconds": seconds, "per_token_seconds": seconds["median"] / (batch * t)}
            agreement = agreement_with_hf(results["cpu"], results["hf"])
            if not agreement["matches_hf"]:
                raise DisagreesWithHuggingFace(
                    f"multi-token decode {dtype_name(dtype)} t={t}: the cpu target's output differs from Hugging "
                    f"Face's by {agreement['rel_diff_vs_hf']:.3g} of its largest element, more than the "
                    f"{agreement['hf_tolerance']:.3g} allowed ({HF_AGREEMENT_EPS[dtype]:g} eps)")
            case["impls"]["cpu"].update(agreement)
            relative = _relative_diff(results["core"], textbook_core_multi(*core_args))
            if relative > CORE_AGREEMENT_EPS[dtype] * torch.finfo(dtype).eps:
                raise DisagreesWithHuggingFace(f"multi-token decode t={t}: the hand-written core differs from the "
                                               f"float64 textbook attention by {relative:.3g}")
            case["impls"]["core"]["rel_diff_vs_exact"] = relative
        for name in ("cpu", "core"):
            case["impls"][name]["time_ratio_vs_hf"] = (case["impls"][name]["seconds"]["median"]
                                                       / case["impls"]["hf"]["seconds"]["median"])
        case["impls"]["cpu"]["time_ratio_vs_core"] = (case["impls"]["cpu"]["seconds"]["median"]
                                                      / case["impls"]["core"]["seconds"]["median"])
        out["cases"].append(case)
        log(f"  t={t} ({md.phase}): " + "; ".join(
            f"{n} {fmt(v['seconds'])} ({v['per_token_seconds'] * 1e6:.0f} us/token)" for n, v in case["impls"].items()))
    return out

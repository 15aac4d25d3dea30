"""3. One CPU decode step: our lowered modules vs Hugging Face's DeepseekV3Attention (same weights), and
beside them a hand-written absorbed attention core (no projections), per dtype."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch

from ..attention import MLAAttention
from ..cache import PagedLatentCache
from ..config import MLAConfig
from ..lowering import lower
from ..metadata import build_metadata, positions_for
from .settings import Settings, dtype_name, fmt, timed


@dataclass
class DecodeBatch:
    hidden: torch.Tensor
    positions: torch.Tensor
    cache: PagedLatentCache
    metadata: object

    def args(self) -> tuple:
        return self.hidden, self.positions, self.cache, self.metadata

    def flat_args(self) -> tuple:
        """The plain definition's flat inputs (what torch.compile of `plain_forward` sees)."""
        md = self.metadata
        return (self.hidden, self.positions, self.cache.latent, self.cache.rope, md.slot_mapping,
                md.block_table, md.seq_lens, md.query_start_loc)


def decode_batch(config: MLAConfig, *, batch: int, context: int, dtype: torch.dtype, block_size: int,
                 seed: int = 0, new_tokens: int = 1) -> DecodeBatch:
    """`batch` requests with `context` cached tokens each (random latent values written directly,
    no prefill) and `new_tokens` new tokens each (decodes: 1, or several to verify)."""
    gen = torch.Generator().manual_seed(seed)
    blocks = -(-(context + new_tokens) // block_size)
    cache = PagedLatentCache.allocate(config, batch * blocks + 1, block_size, dtype=dtype)   # + the padding block
    cache.latent.copy_(torch.randn(cache.latent.shape, generator=gen).to(dtype))
    cache.rope.copy_(torch.randn(cache.rope.shape, generator=gen).to(dtype))
    requests = [(new_tokens, context)] * batch
    rows = [cache.allocator.grow([], context + new_tokens, block_size) for _ in requests]
    hidden = torch.randn(batch * new_tokens, config.hidden_size, generator=gen).to(dtype)
    return DecodeBatch(hidden, positions_for(requests), cache,
                       build_metadata(requests, rows, block_size, decode_tokens=new_tokens))


def absorbed_core(q: torch.Tensor, latent_cache: torch.Tensor, rope_cache: torch.Tensor,
                  block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """The hand-written baseline: latent attention for one token per request, given the absorbed query
    q [B, N, L+R] (q_nope @ W_UK beside q_pe), as one would write it by hand: gather every block-table
    row, bmm, masked softmax (float32), bmm. No projections, no cache write. Returns [B, N, L]."""
    B, N, D = q.shape
    L = latent_cache.shape[-1]
    rows = block_table.long()
    k = torch.cat([latent_cache[rows], rope_cache[rows]], -1).view(B, -1, D)          # [B, S, L+R]
    scores = torch.bmm(q, k.transpose(1, 2)).float() * scale                          # [B, N, S]
    hidden = torch.arange(k.shape[1]).view(1, 1, -1) >= seq_lens.view(-1, 1, 1)
    probs = torch.softmax(scores.masked_fill_(hidden, float("-inf")), dim=-1)
    return torch.bmm(probs.to(q.dtype), k[..., :L])


def textbook_core(q: torch.Tensor, latent_cache: torch.Tensor, rope_cache: torch.Tensor,
                  block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """The same core in float64, one request at a time over exactly its seq_len cache rows: the
    independent computation the core is checked against."""
    L, bs = latent_cache.shape[-1], latent_cache.shape[1]
    out = []
    for b, seq_len in enumerate(seq_lens.tolist()):
        slots = [int(block_table[b, j // bs]) * bs + j % bs for j in range(seq_len)]
        c = latent_cache.reshape(-1, L)[slots].double()
        kr = rope_cache.reshape(-1, rope_cache.shape[-1])[slots].double()
        weights = torch.softmax(scale * (q[b].double() @ torch.cat([c, kr], -1).T), dim=-1)
        out.append(weights @ c)
    return torch.stack(out)


def peak_bytes(fn: Callable[[], torch.Tensor]) -> tuple[int, torch.Tensor]:
    """Peak of bytes allocated minus bytes freed by torch's CPU allocator while `fn` runs, counted
    from the profiler's memory events: the step's working memory above what was live before it
    (weights and the filled cache are not counted; a new cache the step allocates is)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, result


# How close our output must be to Hugging Face's, in eps of the dtype, relative to the largest
# |element| of HF's output. bf16: each side computes in its dtype, rounding after every projection, and
# both end within an ulp or so of the exact result at the largest element (measured 0.35-1.0 eps at the
# quick and the default sizes); two eps is the sum of one per side. A softmax scale 5% off is 3.4-4.9
# eps away, 59% off 44-60 eps. float32: rounding after each op no longer dominates; the order of the
# long reductions does (hidden 2048 into o_proj, thousands of keys per softmax), and it grows with the
# context: measured 1.3-3.6 eps at the quick sizes, 25-28 eps at V2-Lite dims with 512 tokens and 138
# eps (the reference target) with 16384. 512 eps (6.1e-5) is still 1/800 of what a 5% scale error costs.
HF_AGREEMENT_EPS = {torch.bfloat16: 2.0, torch.float32: 512.0}


class DisagreesWithHuggingFace(AssertionError):
    """A benchmarked implementation computed something else than Hugging Face's attention."""


def agreement_with_hf(ours: torch.Tensor, hf: torch.Tensor) -> dict:
    """max |ours - hf|, that relative to max |hf|, the tolerance HF_AGREEMENT_EPS[dtype] * eps of hf's
    dtype, and whether it is met."""
    diff = float((ours.float() - hf.float()).abs().max())
    relative = diff / max(float(hf.float().abs().max()), torch.finfo(torch.float32).tiny)
    tolerance = HF_AGREEMENT_EPS[hf.dtype] * torch.finfo(hf.dtype).eps
    return {"max_abs_diff_vs_hf": diff, "rel_diff_vs_hf": relative, "hf_tolerance": tolerance,
            "matches_hf": relative <= tolerance}


def _random_norm_weights(hf: torch.nn.Module, gen: torch.Generator) -> None:
    """Norm gammas around 1 rather than Hugging Face's ones: a gamma dropped or swapped shows."""
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "layernorm" in name:
                p.copy_((1 + 0.2 * torch.randn(p.shape, generator=gen)).to(p.dtype))


# How close the hand-written core must be to its float64 textbook computation, in eps of the dtype,
# relative to the largest |element| of the exact output. bf16: the core rounds its scores to bf16 (its
# bmm keeps float32 accumulators but writes bf16): measured 0.3-1.6 eps at the quick and default sizes.
# float32: the reductions' order over 576 dims and thousands of keys: measured 2-10 eps up to 4096 keys;
# the same allowance as for the full layers.
CORE_AGREEMENT_EPS = {torch.bfloat16: 4.0, torch.float32: 512.0}
FULL_LAYER = ("reference", "cpu")   # ours, whole layers: checked against Hugging Face


def _relative_diff(ours: torch.Tensor, exact: torch.Tensor) -> float:
    return float((ours.double() - exact).abs().max()) / max(float(exact.abs().max()), torch.finfo(torch.float32).tiny)


def decode_step(s: Settings, log: Callable[[str], None]) -> dict:
    """Times each implementation at each dtype and checks it: full layers against Hugging Face's output
    (agreement_with_hf), the core against textbook_core. Raises DisagreesWithHuggingFace if one
    differs: its timings would compare another computation."""
    config = s.decode_config
    out = {"config": asdict(config) | {"name": config.name}, "dtypes": [dtype_name(d) for d in s.decode_dtypes],
           "full_layer_impls": list(FULL_LAYER), "core_impl": "core", "cases": []}
    for dtype in s.decode_dtypes:
        out["cases"] += _decode_cases(s, config, dtype, out, log)
    return out


def _decode_cases(s: Settings, config: MLAConfig, dtype: torch.dtype, out: dict, log: Callable[[str], None]) -> list:
    from transformers import DynamicCache

    torch.manual_seed(0)
    hf, rotary = hf_deepseek_attention(config, dtype)
    out["hf_attention_implementation"] = hf.config._attn_implementation
    _random_norm_weights(hf, torch.Generator().manual_seed(0))
    layer = MLAAttention(config, dtype=dtype).requires_grad_(False)
    layer.load_state_dict(hf.state_dict())   # the same weights
    # Not the npu target: its emulated kernels are written to be obviously right, not fast (FIA
    # repeats the latent for every head), so timing them would measure the emulation.
    ours = {name: lower(layer, name, ["decode"], block_size=s.block_size) for name in FULL_LAYER}
    cases = []
    for batch in s.batches:
        for context in s.contexts:
            b = decode_batch(config, batch=batch, context=context, dtype=dtype, block_size=s.block_size)
            md = b.metadata
            # each request's context, read through its block table (the cache's padding block is no one's)
            blocks = md.block_table.long()
            kv_nope = b.cache.latent[blocks].reshape(batch, -1, config.kv_lora_rank)[:, :context].unsqueeze(1)
            k_rot = b.cache.rope[blocks].reshape(batch, -1, config.qk_rope_head_dim)[:, :context].unsqueeze(1)
            x = b.hidden.view(batch, 1, -1)
            cos_sin = rotary(x, b.positions.view(batch, 1))   # once per model step in HF, not per layer
            # the core's absorbed query, over the context plus the token this step writes (seq_lens)
            q_absorbed = torch.randn(batch, config.num_heads, config.kv_lora_rank + config.qk_rope_head_dim,
                                     generator=torch.Generator().manual_seed(1)).to(dtype)
            core_args = (q_absorbed, b.cache.latent, b.cache.rope, md.block_table, md.seq_lens, layer.scale)
            results: dict = {}

            def hf_call() -> torch.Tensor:
                hf_cache = DynamicCache()
                hf_cache.update(kv_nope, k_rot, 0)   # the filled context; the step appends one token
                return hf(x, cos_sin, None, cache=hf_cache)[0].view(batch, -1)

            calls = {"hf": hf_call, **{name: (lambda m=m: m(*b.args())) for name, m in ours.items()},
                     "core": lambda: absorbed_core(*core_args)}
            case = {"dtype": dtype_name(dtype), "batch": batch, "context": context, "impls": {}}
            with torch.no_grad():
                for name, fn in calls.items():
                    peak, results[name] = peak_bytes(fn)       # also the warm-up and the output compared
                    case["impls"][name] = {"seconds": timed(fn, s.repeats), "peak_bytes": peak}
                for name in ours:
                    agreement = agreement_with_hf(results[name], results["hf"])
                    if not agreement["matches_hf"]:
                        raise DisagreesWithHuggingFace(
                            f"decode {dtype_name(dtype)} B={batch} ctx={context}: {name}'s output differs from "
                            f"Hugging Face's by {agreement['rel_diff_vs_hf']:.3g} of its largest element, more "
                            f"than the {agreement['hf_tolerance']:.3g} allowed "
                            f"({HF_AGREEMENT_EPS[dtype]:g} eps of {dtype})")
                    case["impls"][name].update(agreement)
                case["impls"]["core"].update(_core_agreement(results["core"], textbook_core(*core_args), dtype))
                if not case["impls"]["core"]["matches_exact"]:
                    raise DisagreesWithHuggingFace(
                        f"decode {dtype_name(dtype)} B={batch} ctx={context}: the hand-written core differs from "
                        f"the float64 textbook attention by {case['impls']['core']['rel_diff_vs_exact']:.3g} of "
                        f"its largest element, more than {CORE_AGREEMENT_EPS[dtype]:g} eps of {dtype}")
            case["memory"] = step_bytes_against_a_copy(layer, b, context, s.repeats)
            for name in FULL_LAYER:
                case["impls"][name]["bandwidth_fraction"] = (case["memory"]["copy_seconds"]["median"]
                                                             / case["impls"][name]["seconds"]["median"])
            hf_median = case["impls"]["hf"]["seconds"]["median"]
            core_median = case["impls"]["core"]["seconds"]["median"]
            for name, v in case["impls"].items():
                if name != "hf":
                    v["time_ratio_vs_hf"] = v["seconds"]["median"] / hf_median
                if name in FULL_LAYER:
                    v["time_ratio_vs_core"] = v["seconds"]["median"] / core_median
            cases.append(case)
            log(f"  decode {dtype_name(dtype)} B={batch} ctx={context}: " + "; ".join(
                f"{n} {fmt(v['seconds'])} peak {v['peak_bytes'] / 2**20:.0f} MiB" for n, v in case["impls"].items()))
    return cases


def step_bytes_against_a_copy(layer: MLAAttention, b: DecodeBatch, context: int, repeats: int) -> dict:
    """What a decode step must read at the least (every request's cached latent and rope rows, the token
    it adds included, and the layer's weights, once each) and how long a copy of as many bytes takes
    here, in the same run: a step that read its bytes at this machine's copy speed would take
    `copy_seconds` (the copy also writes them, so the figure is generous to the machine, strict to us)."""
    rows = b.metadata.seq_lens.sum().item()
    cache = b.cache
    per_row = cache.latent.shape[-1] * cache.latent.element_size() + cache.rope.shape[-1] * cache.rope.element_size()
    weights = sum(p.numel() * p.element_size() for p in layer.parameters())
    total = rows * per_row + weights
    src, dst = torch.ones(total, dtype=torch.uint8), torch.empty(total, dtype=torch.uint8)
    dst.copy_(src)                                       # the pages exist before the copy is timed
    copy = timed(lambda: dst.copy_(src), max(repeats, 3))
    return {"cache_bytes": rows * per_row, "weight_bytes": weights, "bytes": total, "copy_seconds": copy,
            "copy_gb_per_s": total / copy["median"] / 1e9, "context": context}


def _core_agreement(core: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> dict:
    """The core has no projections, so Hugging Face's layer output is not its oracle; the textbook is."""
    relative = _relative_diff(core, exact)
    tolerance = CORE_AGREEMENT_EPS[dtype] * torch.finfo(dtype).eps
    return {"checked_against": "textbook_core (float64), not Hugging Face: the core has no projections",
            "rel_diff_vs_exact": relative, "exact_tolerance": tolerance, "matches_exact": relative <= tolerance}


def hf_deepseek_attention(config: MLAConfig, dtype: torch.dtype):
    """Hugging Face's DeepseekV3Attention (sdpa) and rotary embedding for `config`, random weights."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    fields = config.to_hf()
    rope = fields.pop("rope_scaling", None)
    rope_parameters = {"rope_type": "default", "rope_theta": config.rope_theta}
    if rope is not None:
        rope = {k: v for k, v in rope.items() if k != "type"}
        rope_parameters = {"rope_type": "yarn", "rope_theta": config.rope_theta, **rope}
    hf_config = DeepseekV3Config(**fields, rope_parameters=rope_parameters, rope_interleave=True,
                                 attention_bias=False, attention_dropout=0.0)
    hf_config._attn_implementation = "sdpa"
    return (DeepseekV3Attention(hf_config, layer_idx=0).to(dtype).requires_grad_(False),
            DeepseekV3RotaryEmbedding(hf_config))

"""3. One CPU decode step: our lowered modules vs Hugging Face's DeepseekV3Attention, same weights."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch

from passes import PassManager, eliminate_dead_code, remove_noop_views
from passes.absorb import absorb_kv_weights
from passes.cost_model import choose_attention_form
from passes.page import page_latent_attention

from ..attention import MLAAttention
from ..cache import PagedLatentCache
from ..capture import capture
from ..config import MLAConfig
from ..lowering import LoweredMLA, lower
from ..metadata import build_metadata, positions_for
from ..targets import Target
from .settings import Settings, fmt, timed


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
                 seed: int = 0) -> DecodeBatch:
    """`batch` requests with `context` cached tokens each (random latent values written directly,
    no prefill) and one new token each."""
    gen = torch.Generator().manual_seed(seed)
    blocks = -(-(context + 1) // block_size)
    cache = PagedLatentCache.allocate(config, batch * blocks + 1, block_size, dtype=dtype)   # + the padding block
    cache.latent.copy_(torch.randn(cache.latent.shape, generator=gen).to(dtype))
    cache.rope.copy_(torch.randn(cache.rope.shape, generator=gen).to(dtype))
    requests = [(1, context)] * batch
    rows = [cache.allocator.grow([], context + 1, block_size) for _ in requests]
    hidden = torch.randn(batch, config.hidden_size, generator=gen).to(dtype)
    return DecodeBatch(hidden, positions_for(requests), cache, build_metadata(requests, rows, block_size))


ABSORBED_CPU_PIPELINE = [
    remove_noop_views,       # as every pipeline starts
    choose_attention_form,   # the cost model picks absorbed for decode
    absorb_kv_weights,       # W_UK / W_UV folded: no per-step decompression of the context
    page_latent_attention,   # latent attention reads the paged cache (plain-PyTorch mla:: kernel)
    eliminate_dead_code,
]


def lower_absorbed_cpu(layer: MLAAttention, block_size: int) -> LoweredMLA:
    """The npu pipeline's target-independent passes only: what absorption and paging buy on a CPU,
    with mla:: primitives run as plain PyTorch (the npu emulation's kernels are not fast code)."""
    gm = capture(layer, "decode", block_size=block_size)
    report = PassManager(ABSORBED_CPU_PIPELINE).run(gm)
    target = Target("absorbed-cpu", "absorb + page, mla:: primitives as plain PyTorch",
                    lambda phase: ABSORBED_CPU_PIPELINE)
    return LoweredMLA(layer, target, {"decode": gm}, {"decode": report}, block_size)


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
# |element| of HF's output. Each side computes in its dtype, rounding after every projection, and
# both end within an ulp or so of the exact result at the largest element (measured in bf16: 0.35-1.0
# eps at the quick and the default sizes); two eps is the sum of one per side. A softmax scale 5%
# off is 3.4-4.9 eps away, 59% off 44-60 eps.
HF_AGREEMENT_EPS = 2.0


class DisagreesWithHuggingFace(AssertionError):
    """A benchmarked implementation computed something else than Hugging Face's attention."""


def agreement_with_hf(ours: torch.Tensor, hf: torch.Tensor) -> dict:
    """max |ours - hf|, that relative to max |hf|, the tolerance HF_AGREEMENT_EPS * eps of hf's
    dtype, and whether it is met."""
    diff = float((ours.float() - hf.float()).abs().max())
    relative = diff / max(float(hf.float().abs().max()), torch.finfo(torch.float32).tiny)
    tolerance = HF_AGREEMENT_EPS * torch.finfo(hf.dtype).eps
    return {"max_abs_diff_vs_hf": diff, "rel_diff_vs_hf": relative, "hf_tolerance": tolerance,
            "matches_hf": relative <= tolerance}


def _random_norm_weights(hf: torch.nn.Module, gen: torch.Generator) -> None:
    """Norm gammas around 1 rather than Hugging Face's ones: a gamma dropped or swapped shows."""
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "layernorm" in name:
                p.copy_((1 + 0.2 * torch.randn(p.shape, generator=gen)).to(p.dtype))


def decode_step(s: Settings, log: Callable[[str], None]) -> dict:
    """Times each implementation and checks it against Hugging Face's output (agreement_with_hf);
    raises DisagreesWithHuggingFace if one differs: its timings would compare another computation."""
    from transformers import DynamicCache

    config, dtype = s.decode_config, s.dtype
    torch.manual_seed(0)
    hf, rotary = hf_deepseek_attention(config, dtype)
    _random_norm_weights(hf, torch.Generator().manual_seed(0))
    layer = MLAAttention(config, dtype=dtype).requires_grad_(False)
    layer.load_state_dict(hf.state_dict())   # the same weights
    # Not the npu target: its emulated kernels are written to be obviously right, not fast (FIA
    # repeats the latent for every head), so timing them would measure the emulation.
    ours = {"reference": lower(layer, "reference", ["decode"], block_size=s.block_size),
            "absorbed-cpu": lower_absorbed_cpu(layer, s.block_size)}
    out = {"config": asdict(config) | {"name": config.name}, "dtype": str(dtype).replace("torch.", ""),
           "hf_attention_implementation": hf.config._attn_implementation, "cases": []}
    for batch in s.batches:
        for context in s.contexts:
            b = decode_batch(config, batch=batch, context=context, dtype=dtype, block_size=s.block_size)
            # each request's context, read through its block table (the cache's padding block is no one's)
            blocks = b.metadata.block_table.long()
            kv_nope = b.cache.latent[blocks].reshape(batch, -1, config.kv_lora_rank)[:, :context].unsqueeze(1)
            k_rot = b.cache.rope[blocks].reshape(batch, -1, config.qk_rope_head_dim)[:, :context].unsqueeze(1)
            x = b.hidden.view(batch, 1, -1)
            cos_sin = rotary(x, b.positions.view(batch, 1))   # once per model step in HF, not per layer
            results: dict = {}

            def hf_call() -> torch.Tensor:
                hf_cache = DynamicCache()
                hf_cache.update(kv_nope, k_rot, 0)   # the filled context; the step appends one token
                return hf(x, cos_sin, None, cache=hf_cache)[0].view(batch, -1)

            calls = {"hf": hf_call, **{name: (lambda m=m: m(*b.args())) for name, m in ours.items()}}
            case = {"batch": batch, "context": context, "impls": {}}
            with torch.no_grad():
                for name, fn in calls.items():
                    peak, results[name] = peak_bytes(fn)       # also the warm-up and the output compared
                    case["impls"][name] = {"seconds": timed(fn, s.repeats), "peak_bytes": peak}
                for name in ours:
                    agreement = agreement_with_hf(results[name], results["hf"])
                    if not agreement["matches_hf"]:
                        raise DisagreesWithHuggingFace(
                            f"decode B={batch} ctx={context}: {name}'s output differs from Hugging Face's by "
                            f"{agreement['rel_diff_vs_hf']:.3g} of its largest element, more than the "
                            f"{agreement['hf_tolerance']:.3g} allowed ({HF_AGREEMENT_EPS:g} eps of {dtype})")
                    case["impls"][name].update(agreement)
                    case["impls"][name]["time_ratio_vs_hf"] = (case["impls"][name]["seconds"]["median"]
                                                               / case["impls"]["hf"]["seconds"]["median"])
            out["cases"].append(case)
            log(f"  decode B={batch} ctx={context}: " + "; ".join(
                f"{n} {fmt(v['seconds'])} peak {v['peak_bytes'] / 2**20:.0f} MiB" for n, v in case["impls"].items()))
    return out


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

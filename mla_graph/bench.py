"""Benchmarks: what the lowering costs and buys, measured on this machine's CPU.

Four sections, each a function returning plain JSON data:
  lowering_cost      lower 1 / 8 / 61 layers per target (shapes lowered once, then re-bound), beside
                     lowering every layer on its own and beside torch.compile(inductor) of the same module
  kernels_per_decode device kernels in each target's lowered decode graph (views excluded)
  decode_step        one CPU decode step: our lowered modules vs Hugging Face's DeepseekV3Attention
  kv_cache_bytes     cache bytes per token per layer, latent vs decompressed K/V, per preset

Timings are medians of repeated runs in this process, with quartiles and min/max. Nothing here
asserts a number; `run_benchmarks` returns the data and `write_outputs` writes JSON, PNG and Markdown.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from passes import PassManager, eliminate_dead_code, remove_noop_views
from passes.absorb import absorb_kv_weights
from passes.base import VIEW_OPS
from passes.cost_model import choose_attention_form
from passes.page import page_latent_attention

from .attention import MLAAttention
from .cache import PagedLatentCache
from .capture import capture
from .config import MLAConfig, preset_names
from .kernels import device_kernels
from .lowering import LoweredMLA, lower
from .metadata import build_metadata, positions_for
from .model_lowering import LayerLowering, lower_layers
from .rope import cos_sin_table
from .targets import TARGETS, Target

# Ops that move no data on a device (views, shape queries, tuple access): not counted as kernels.

# vllm-ascend's eager decode at the #2459 split (reference doc section 3b, front end from 1 and 3a),
# one entry per device kernel launched per layer per step; docs/benchmarks.md explains the count.
VLLM_ASCEND_EAGER_DECODE = (
    "q_a_proj matmul", "q_a_layernorm npu_rms_norm", "q_b_proj matmul", "kv_a_proj_with_mqa matmul",
    "kv_a_layernorm npu_rms_norm", "q_pe de-interleave copy", "k_pe de-interleave copy",
    "_npu_rotary_embedding (q and k)", "_npu_reshape_and_cache", "bmm q_nope x W_UK_T",
    "cat(ql_nope, q_pe)", "cat(nope_cache, rope_cache): 576-wide cache copy", "_npu_paged_attention_mla",
    "bmm x W_UV", "o_proj matmul",
)


@dataclass(frozen=True)
class Settings:
    """What to measure. `Settings.default()` fits 10 minutes on 2 CPU cores, `quick()` one minute."""

    quick: bool
    repeats: int
    lowering_config: MLAConfig
    lowering_tp: int
    layer_counts: tuple[int, ...]
    separate_counts: tuple[int, ...]      # layers lowered one by one without reuse ("reference" only)
    compile_counts: tuple[int, ...]       # torch.compile(inductor), a subset of layer_counts; () skips it
    decode_config: MLAConfig
    batches: tuple[int, ...]
    contexts: tuple[int, ...]
    dtype: torch.dtype = torch.bfloat16
    block_size: int = 128

    @classmethod
    def default(cls) -> "Settings":
        return cls(quick=False, repeats=3, lowering_config=MLAConfig.preset("deepseek-v3"), lowering_tp=8,
                   layer_counts=(1, 8, 61), separate_counts=(8,), compile_counts=(1, 8),
                   decode_config=MLAConfig.preset("deepseek-v2-lite"), batches=(1, 8),
                   contexts=(512, 4096, 16384))

    @classmethod
    def quick_run(cls) -> "Settings":
        tiny = MLAConfig.preset("deepseek-v2-lite").replace(
            hidden_size=256, num_heads=4, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
            v_head_dim=32, name="tiny-v2-lite")
        return cls(quick=True, repeats=2, lowering_config=tiny, lowering_tp=1,
                   layer_counts=(1, 2), separate_counts=(2,), compile_counts=(), decode_config=tiny,
                   batches=(1, 2), contexts=(32, 96), block_size=16)


# ---- statistics and the machine -----------------------------------------------------------------
def summary(samples: list[float]) -> dict:
    """Median, quartiles and range of repeated measurements (seconds or bytes)."""
    s = sorted(samples)
    q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive") if len(s) > 1 else (s[0], s[0], s[0])
    return {"median": statistics.median(s), "q1": q1, "q3": q3, "min": s[0], "max": s[-1], "n": len(s),
            "samples": s}


def timed(fn: Callable[[], object], repeats: int) -> dict:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return summary(samples)


def machine() -> dict:
    info = {"platform": platform.platform(), "machine": platform.machine(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    except OSError:
        info["cpu"] = platform.processor()
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = os.getloadavg()
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        info["memory_gib"] = round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1)
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    return info


# ---- 1. lowering cost ------------------------------------------------------------------------------
def unfilled_layers(config: MLAConfig, count: int, *, dtype: torch.dtype, tp_size: int) -> list[MLAAttention]:
    """Layers at the model's real sizes with allocated but unwritten weights: lowering reads shapes
    (and kv_b_proj, for absorb), so 61 DeepSeek-V3 layers cost address space, not resident memory."""
    table = cos_sin_table(config)   # first, on the CPU: the table is cached and shared by all layers
    layers = []
    for _ in range(count):
        with torch.device("meta"):
            layer = MLAAttention(config, dtype=dtype, tp_size=tp_size)
        layer = layer.to_empty(device="cpu").requires_grad_(False)
        layer.cos_sin = table
        layers.append(layer)
    return layers


def lowering_cost(s: Settings, layers: list[MLAAttention], log: Callable[[str], None]) -> dict:
    """Lower the decode phase (the graph a graph-mode runtime compiles) of 1..61 layers per target."""
    config = s.lowering_config
    out = {"preset": config.name, "tp_size": s.lowering_tp, "heads_per_rank": layers[0].num_heads,
           "dtype": str(s.dtype).replace("torch.", ""), "phases": ["decode"], "verify": True, "targets": {}}
    for target in TARGETS:
        row: dict = {"reused": {}, "separate": {}, "rebound": True, "not_rebound_because": ""}
        for n in s.layer_counts:
            if not row["rebound"] and n > 1:
                row["reused"][str(n)] = None   # every layer would be lowered on its own: not timed
                continue
            shapes: list[LayerLowering] = []
            row["reused"][str(n)] = timed(lambda: lower_layers(layers[:n], target, ["decode"],
                                                               block_size=s.block_size, summary=shapes), s.repeats)
            row["rebound"] = all(g.reused for g in shapes)
            row["not_rebound_because"] = next((g.reason for g in shapes if not g.reused), "")
            log(f"  lower {n:3d} layer(s) for {target}: {fmt(row['reused'][str(n)])}")
        if not row["rebound"]:
            log(f"  {target}: layers not re-bound ({row['not_rebound_because']}); more layers not timed")
        if target == "reference":
            for n in s.separate_counts:
                row["separate"][str(n)] = timed(
                    lambda: [lower(l, target, ["decode"], block_size=s.block_size) for l in layers[:n]], s.repeats)
                log(f"  lower {n:3d} layer(s) for {target} one by one, no reuse: {fmt(row['separate'][str(n)])}")
        out["targets"][target] = row
    out["torch_compile"] = compile_cost(s, layers, out["targets"], log)
    return out


def compile_cost(s: Settings, layers: list[MLAAttention], ours: dict, log: Callable[[str], None]) -> dict:
    """torch.compile(layer.plain_forward, backend="inductor", dynamic=True): the first decode call
    minus an eager call, with a fresh inductor cache, beside our decode lowering of the same layers
    (same run). The plain math, not `layer` itself: under torch.compile an MLAAttention call is one
    opaque mla::layer node (for the mla_graph backend), which would leave inductor nothing to do."""
    if not s.compile_counts:
        return {"skipped": "not run in --quick mode (inductor compiles C++ with the system compiler)"}
    for layer in layers[: max(s.compile_counts)]:   # real values: the compiled code runs once
        for p in layer.parameters():
            p.normal_(0.0, 0.02)
    batch = decode_batch(layers[0].config, batch=2, context=100, dtype=s.dtype, block_size=s.block_size)
    result: dict = {"backend": "inductor", "dynamic": True, "phase": "decode", "layers": {}}
    saved = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory() as cache_root, torch.no_grad():
        try:
            eager = timed(lambda: layers[0].plain_forward(*batch.flat_args()), s.repeats)["median"]
            for n in s.compile_counts:
                # a cold start for each count: a fresh inductor cache (later layers of the same count
                # may hit what the first compiled, as they would in a real model)
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache_root, f"layers-{n}")
                torch._dynamo.reset()
                start = time.perf_counter()
                for layer in layers[:n]:
                    torch.compile(layer.plain_forward, backend="inductor", dynamic=True)(*batch.flat_args())
                compile_s = time.perf_counter() - start - n * eager
                lowered = {t: v["reused"][str(n)]["median"] for t, v in ours.items() if v["reused"].get(str(n))}
                result["layers"][str(n)] = {"compile_seconds": compile_s, "ours_decode_seconds": lowered,
                                            "ratio_compile_over_ours": {t: compile_s / v for t, v in lowered.items()}}
                log(f"  torch.compile inductor, {n} layer(s): {compile_s:.2f}s; our decode lowering "
                    + ", ".join(f"{t} {v:.2f}s (x{compile_s / v:.1f})" for t, v in lowered.items()))
        finally:
            torch._dynamo.reset()
            if saved is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved
    result["eager_call_seconds"] = eager
    return result


# ---- 2. kernels per decode layer ---------------------------------------------------------------------
def count_kernels(gm: torch.fx.GraphModule) -> dict[str, int]:
    """Device kernels of `gm` by op (mla_graph.kernels.device_kernels: views, torchair markers and
    the cache write-back copies GE turns into ref outputs are not kernels)."""
    counts: dict[str, int] = {}
    for op in device_kernels(gm):
        counts[op] = counts.get(op, 0) + 1
    return dict(sorted(counts.items()))


def kernels_per_decode(s: Settings, layer: MLAAttention) -> dict:
    """Lowers each target's decode graph once (which also warms up what lowering_cost times)."""
    config = layer.config
    out = {"preset": config.name, "excluded_ops": sorted(str(op) for op in VIEW_OPS) + ["air:: markers",
           "copy_ of an updated cache into its graph input"], "targets": {},
           "vllm_ascend_eager_decode": {"total": len(VLLM_ASCEND_EAGER_DECODE),
                                        "kernels": list(VLLM_ASCEND_EAGER_DECODE)}}
    for target in TARGETS:
        counts = count_kernels(lower(layer, target, ["decode"], block_size=s.block_size).graphs["decode"])
        out["targets"][target] = {"total": sum(counts.values()), "by_op": counts}
    return out


# ---- 3. CPU decode step vs Hugging Face ------------------------------------------------------------
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
    cache = PagedLatentCache.allocate(config, batch * blocks, block_size, dtype=dtype)
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


def decode_step(s: Settings, log: Callable[[str], None]) -> dict:
    from transformers import DynamicCache

    config, dtype = s.decode_config, s.dtype
    torch.manual_seed(0)
    hf, rotary = hf_deepseek_attention(config, dtype)
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
            kv_nope = b.cache.latent.view(batch, -1, config.kv_lora_rank)[:, :context].unsqueeze(1).contiguous()
            k_rot = b.cache.rope.view(batch, -1, config.qk_rope_head_dim)[:, :context].unsqueeze(1).contiguous()
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
                    case["impls"][name]["max_abs_diff_vs_hf"] = float((results[name].float()
                                                                       - results["hf"].float()).abs().max())
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


# ---- 4. KV cache bytes ---------------------------------------------------------------------------------
def kv_cache_bytes(s: Settings) -> dict:
    """Per token per layer (all heads, tp 1): our paged latent cache, measured from an allocated
    cache, vs a cache of decompressed K and V (num_heads x (qk_head_dim + v_head_dim))."""
    out = {"dtype": str(s.dtype).replace("torch.", ""), "presets": {}}
    for name in preset_names():
        config = MLAConfig.preset(name)
        cache = PagedLatentCache.allocate(config, 1, s.block_size, dtype=s.dtype)
        ours = (cache.latent.nbytes + cache.rope.nbytes) // s.block_size
        full = config.num_heads * (config.qk_head_dim + config.v_head_dim) * cache.latent.element_size()
        out["presets"][name] = {"latent": ours, "decompressed_kv": full, "ratio": full / ours}
    return out


# ---- the run and its outputs ---------------------------------------------------------------------
def fmt(stat: dict) -> str:
    return (f"median {stat['median'] * 1e3:.1f} ms (IQR {stat['q1'] * 1e3:.1f}-{stat['q3'] * 1e3:.1f}, "
            f"min {stat['min'] * 1e3:.1f}, max {stat['max'] * 1e3:.1f}, n={stat['n']})")


def run_benchmarks(s: Settings, log: Callable[[str], None] = print, command: str = "mla-graph bench") -> dict:
    start = time.perf_counter()
    data: dict = {"schema": 1, "mode": "quick" if s.quick else "default", "command": command,
                  "machine": machine()}
    layers = unfilled_layers(s.lowering_config, max(s.layer_counts + s.separate_counts), dtype=s.dtype,
                             tp_size=s.lowering_tp)
    log("2. kernels per decode layer (first: it warms up the lowering timed in 1)")
    data["kernels_per_decode"] = kernels_per_decode(s, layers[0])
    for t, v in data["kernels_per_decode"]["targets"].items():
        log(f"  {t}: {v['total']} kernels ({', '.join(f'{k} x{n}' for k, n in v['by_op'].items())})")
    log(f"  vllm-ascend eager decode: {len(VLLM_ASCEND_EAGER_DECODE)} kernels")
    log("1. lowering cost")
    data["lowering_cost"] = lowering_cost(s, layers, log)
    log("3. CPU decode step vs Hugging Face DeepseekV3Attention")
    data["decode_step"] = decode_step(s, log)
    log("4. KV cache bytes per token per layer")
    data["kv_cache_bytes"] = kv_cache_bytes(s)
    for name, v in data["kv_cache_bytes"]["presets"].items():
        log(f"  {name}: latent {v['latent']} B, decompressed K/V {v['decompressed_kv']} B (x{v['ratio']:.1f})")
    data["total_seconds"] = time.perf_counter() - start
    return data


# ---- outputs: JSON, a plot, Markdown tables ----------------------------------------------------------
DOCS_BEGIN, DOCS_END = "<!-- bench:begin -->", "<!-- bench:end -->"


def write_outputs(data: dict, out_dir: str, docs: str | None = None) -> list[str]:
    """results.json, bench.png and results.md in `out_dir`; with `docs`, the tables also replace the
    part of that Markdown file between DOCS_BEGIN and DOCS_END."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, name) for name in ("results.json", "bench.png", "results.md")]
    with open(paths[0], "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1)
        fh.write("\n")
    plot(data, paths[1])
    tables = markdown(data)
    with open(paths[2], "w", encoding="utf-8") as fh:
        fh.write(tables)
    if docs is not None:
        with open(docs, encoding="utf-8") as fh:
            text = fh.read()
        if DOCS_BEGIN not in text or DOCS_END not in text:
            raise ValueError(f"{docs} has no {DOCS_BEGIN} ... {DOCS_END} section to replace")
        head, rest = text.split(DOCS_BEGIN, 1)
        with open(docs, "w", encoding="utf-8") as fh:
            fh.write(head + DOCS_BEGIN + "\n" + tables + DOCS_END + rest.split(DOCS_END, 1)[1])
        paths.append(docs)
    return paths


def _ms(stat: dict | None) -> str:
    if stat is None:
        return "not timed"
    return f"{stat['median'] * 1e3:.1f} ({stat['q1'] * 1e3:.1f}-{stat['q3'] * 1e3:.1f})"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def markdown(data: dict) -> str:
    m, low = data["machine"], data["lowering_cost"]
    parts = [f"Produced by `{data['command']}` ({data['mode']} mode) in {data['total_seconds']:.0f} s on "
             f"{m.get('cpu') or m['machine']}, {m['cpu_count']} cores, torch {m['torch']} "
             f"({m['torch_threads']} threads), transformers {m.get('transformers')}; load average at start "
             f"{', '.join(f'{x:.1f}' for x in m.get('load_average_at_start', ()))}. "
             "Times: median (interquartile range) of repeated runs in one process, in ms.\n"]
    counts = sorted({int(n) for t in low["targets"].values() for n in t["reused"]})
    sep = sorted({int(n) for t in low["targets"].values() for n in t["separate"]})
    parts.append(f"\n### 1. Lowering cost: {low['preset']}, tp {low['tp_size']} ({low['heads_per_rank']} heads "
                 f"per rank), {low['dtype']}, decode phase, verifier on\n\n")
    rows = []
    for target, t in low["targets"].items():
        rows.append([target] + [_ms(t["reused"][str(n)]) for n in counts]
                    + [_ms(t["separate"].get(str(n))) for n in sep] + ["yes" if t["rebound"] else "no"])
    parts.append(_table(["target"] + [f"{n} layer(s)" for n in counts] + [f"{n} one by one" for n in sep]
                        + ["re-bound"], rows))
    reasons = [f"{t}: {v['not_rebound_because']}" for t, v in low["targets"].items() if not v["rebound"]]
    if reasons:
        parts.append("\nNot re-bound, so more layers were not timed: " + "; ".join(reasons) + "\n")
    tc = low["torch_compile"]
    if "skipped" in tc:
        parts.append(f"\ntorch.compile: skipped ({tc['skipped']}).\n")
    else:
        parts.append(f"\ntorch.compile(backend=\"inductor\", dynamic=True), cold cache, decode call "
                     f"(eager call {tc['eager_call_seconds'] * 1e3:.0f} ms subtracted) vs our decode-phase "
                     "lowering of the same layers. Each row starts from an empty inductor cache; the first "
                     "row also pays inductor's one-time start-up in the process (toolchain probe, headers), "
                     "and later layers of a row reuse what the first compiled, as in a real model:\n\n")
        targets = list(low["targets"])
        parts.append(_table(["layers", "torch.compile s"] + [f"ours {t} s (ratio)" for t in targets],
                            [[n, f"{v['compile_seconds']:.2f}"] + [
                                f"{v['ours_decode_seconds'][t]:.2f} (x{v['ratio_compile_over_ours'][t]:.1f})"
                                if t in v["ours_decode_seconds"] else "not timed"
                                for t in targets] for n, v in tc["layers"].items()]))
    k = data["kernels_per_decode"]
    parts.append(f"\n### 2. Device kernels per decode layer ({k['preset']}, views excluded)\n\n")
    rows = [[t, str(v["total"]), ", ".join(f"{op} x{n}" for op, n in v["by_op"].items())]
            for t, v in k["targets"].items()]
    rows.append(["vllm-ascend eager decode (#2459)", str(k["vllm_ascend_eager_decode"]["total"]),
                 ", ".join(k["vllm_ascend_eager_decode"]["kernels"])])
    parts.append(_table(["path", "kernels", "which"], rows))
    d = data["decode_step"]
    impls = list(d["cases"][0]["impls"])
    parts.append(f"\n### 3. CPU decode step, {d['config']['name']} dimensions ({d['config']['num_heads']} heads), "
                 f"{d['dtype']}\n\nTime in ms, median (IQR); ratio = ours / Hugging Face; peak = working "
                 "memory of the step in MiB.\n\n")
    header = ["batch", "context"]
    for name in impls:
        header += [f"{name} ms", f"{name} peak"] + ([f"{name} ratio"] if name != "hf" else [])
    rows = []
    for case in d["cases"]:
        row = [str(case["batch"]), str(case["context"])]
        for name in impls:
            v = case["impls"][name]
            row += [_ms(v["seconds"]), f"{v['peak_bytes'] / 2**20:.0f}"]
            if name != "hf":
                row.append(f"{v['time_ratio_vs_hf']:.2f}")
        rows.append(row)
    parts.append(_table(header, rows))
    kv = data["kv_cache_bytes"]
    parts.append(f"\n### 4. KV cache bytes per token per layer ({kv['dtype']}, all heads)\n\n")
    parts.append(_table(["preset", "latent (ours)", "decompressed K/V", "ratio"],
                        [[n, str(v["latent"]), str(v["decompressed_kv"]), f"{v['ratio']:.1f}"]
                         for n, v in kv["presets"].items()]))
    return "".join(parts)


def plot(data: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    ax = axes[0][0]
    low = data["lowering_cost"]
    for target, t in low["targets"].items():
        ns = sorted(int(n) for n, v in t["reused"].items() if v is not None)
        ax.plot(ns, [t["reused"][str(n)]["median"] for n in ns], marker="o", label=f"{target}, shapes reused")
        ns = sorted(int(n) for n in t["separate"])
        if ns:
            ax.plot(ns, [t["separate"][str(n)]["median"] for n in ns], marker="x", linestyle="none",
                    label=f"{target}, one by one")
    for n, v in low["torch_compile"].get("layers", {}).items():
        ax.plot([int(n)], [v["compile_seconds"]], marker="s", color="black", linestyle="none",
                label="torch.compile inductor (decode)" if n == "1" else None)
    ax.set(title=f"Lowering {low['preset']} (tp {low['tp_size']})", xlabel="layers", ylabel="seconds")
    ax.legend(fontsize=7)
    ax = axes[0][1]
    k = data["kernels_per_decode"]
    names = list(k["targets"]) + ["vllm-ascend eager"]
    ax.bar(names, [v["total"] for v in k["targets"].values()] + [k["vllm_ascend_eager_decode"]["total"]])
    ax.set(title="Device kernels per decode layer", ylabel="kernels")
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    ax = axes[1][0]
    d = data["decode_step"]
    for batch in sorted({c["batch"] for c in d["cases"]}):
        cases = [c for c in d["cases"] if c["batch"] == batch]
        for name in cases[0]["impls"]:
            ax.plot([c["context"] for c in cases], [c["impls"][name]["seconds"]["median"] for c in cases],
                    marker="o", label=f"{name}, batch {batch}")
    ax.set(title=f"CPU decode step, {d['config']['name']}", xlabel="context tokens", ylabel="seconds",
           xscale="log", yscale="log")
    ax.legend(fontsize=7)
    ax = axes[1][1]
    kv = data["kv_cache_bytes"]["presets"]
    xs = range(len(kv))
    ax.bar([x - 0.2 for x in xs], [v["latent"] for v in kv.values()], width=0.4, label="latent (ours)")
    ax.bar([x + 0.2 for x in xs], [v["decompressed_kv"] for v in kv.values()], width=0.4, label="decompressed K/V")
    ax.set_xticks(list(xs), list(kv), fontsize=8)
    ax.set(title="KV cache bytes per token per layer", yscale="log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)

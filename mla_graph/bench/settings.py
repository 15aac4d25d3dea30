"""What a benchmark run measures (Settings), how a timing is taken and summarised, and the machine."""
from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..config import MLAConfig


@dataclass(frozen=True)
class Settings:
    """What to measure. `Settings.default()` fits 15 minutes on 2 CPU cores, `quick_run()` one minute."""

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
    dtype: torch.dtype = torch.bfloat16   # lowering cost and KV cache bytes
    decode_dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float32)
    block_size: int = 128
    generate_prompt_tokens: int = 4096    # 5. generate: prompt length of the tiny Hugging Face model
    generate_new_tokens: int = 32         # greedy tokens generated after it

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
                   batches=(1, 2), contexts=(32, 96), block_size=16,
                   generate_prompt_tokens=64, generate_new_tokens=4)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


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


def fmt(stat: dict) -> str:
    return (f"median {stat['median'] * 1e3:.1f} ms (IQR {stat['q1'] * 1e3:.1f}-{stat['q3'] * 1e3:.1f}, "
            f"min {stat['min'] * 1e3:.1f}, max {stat['max'] * 1e3:.1f}, n={stat['n']})")

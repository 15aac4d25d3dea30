"""1. Lowering cost: lower the decode phase of 1..61 layers per target, shapes lowered once and
re-bound, beside lowering each layer on its own and beside torch.compile(inductor) of the same math."""
from __future__ import annotations

import gc
import os
import tempfile
import time
from typing import Callable

import torch

from ..attention import MLAAttention
from ..config import MLAConfig
from ..lowering import lower
from ..model_lowering import LayerLowering, lower_layers
from ..rope import cos_sin_table
from ..targets import TARGETS
from .decode_step import decode_batch
from .settings import Settings, fmt, summary, timed


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
            row["reused"][str(n)] = timed_lowering(lambda: lower_layers(layers[:n], target, ["decode"],
                                                                        block_size=s.block_size, summary=shapes),
                                                   s.repeats)
            row["rebound"] = all(g.reused for g in shapes)
            row["not_rebound_because"] = next((g.reason for g in shapes if not g.reused), "")
            log(f"  lower {n:3d} layer(s) for {target}: {fmt(row['reused'][str(n)])}")
        if not row["rebound"]:
            log(f"  {target}: layers not re-bound ({row['not_rebound_because']}); more layers not timed")
        if target == "reference":
            for n in s.separate_counts:
                row["separate"][str(n)] = timed_lowering(
                    lambda: [lower(l, target, ["decode"], block_size=s.block_size) for l in layers[:n]], s.repeats)
                log(f"  lower {n:3d} layer(s) for {target} one by one, no reuse: {fmt(row['separate'][str(n)])}")
        out["targets"][target] = row
    out["torch_compile"] = compile_cost(s, layers, out["targets"], log)
    return out


def timed_lowering(fn: Callable[[], object], repeats: int) -> dict:
    """Like settings.timed, but the lowered modules are dropped and collected outside the timing: their
    GraphModules sit in reference cycles, so without a collection here each repeat's derived weights
    (61 torchair layers: 2.4 GB) would be freed by whichever later sample the garbage collector runs in."""
    samples = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        lowered = fn()
        samples.append(time.perf_counter() - start)
        del lowered
    gc.collect()
    return summary(samples)


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

"""The `mla-graph` command line."""
from __future__ import annotations

import argparse
import sys
import time

import torch

from .capture import PHASES
from .config import MLAConfig, preset_names
from .targets import TARGETS

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=preset_names() + ["deepseek-r1"],
                     help="a built-in model configuration")
    src.add_argument("--hf-config", metavar="PATH", help="a Hugging Face config.json (or its folder)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16", help="weight dtype (default bf16)")
    p.add_argument("--tp-size", type=int, default=1, help="tensor-parallel size: the layer holds num_heads/tp_size heads")
    p.add_argument("--block-size", type=int, default=128, help="paged cache block size (default 128)")


def _phases(values: list[str] | None) -> list[str]:
    if not values or "all" in values:
        return list(PHASES)
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mla-graph", description=(
        "Lower DeepSeek Multi-head Latent Attention, written once as an FX graph, through passes."))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    low = sub.add_parser("lower", help="lower one MLA layer and print the pipeline",
                         description="Capture one MLA layer (random weights at the model's dimensions), "
                                     "run the target's pass pipeline per phase and print what each pass did.")
    _add_model_args(low)
    low.add_argument("--target", choices=sorted(TARGETS), default="reference", help="lowering target")
    low.add_argument("--phase", action="append", choices=list(PHASES) + ["all"],
                     help="phase to lower; repeat for several (default: all)")
    low.add_argument("--dump", metavar="DIR", help="write numbered per-pass dumps to DIR/<phase>/")
    low.add_argument("--verify", action="store_true",
                     help="run a random batch of each phase through the plain definition and the lowered "
                          "module and compare outputs and caches (exit 1 on disagreement)")
    low.add_argument("--seed", type=int, default=0, help="seed for weights and inputs")
    return parser


def _config(args: argparse.Namespace) -> MLAConfig:
    return MLAConfig.preset(args.preset) if args.preset else MLAConfig.from_hf(args.hf_config)


def cmd_lower(args: argparse.Namespace) -> int:
    from .attention import MLAAttention
    from .checking import compare_with_plain
    from .lowering import lower

    config = _config(args)
    dtype = _DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    layer = MLAAttention(config, dtype=dtype, tp_size=args.tp_size).requires_grad_(False)
    print(f"{config.name}: hidden {config.hidden_size}, heads {layer.num_heads}"
          f"{f' of {config.num_heads} (tp {args.tp_size})' if args.tp_size > 1 else ''}, "
          f"q_lora {config.q_lora_rank}, kv_lora {config.kv_lora_rank}, {args.dtype}; "
          f"weights built in {time.perf_counter() - start:.1f}s")
    phases = _phases(args.phase)
    if args.target == "npu":
        from .npu import npu_backend
        print(f"npu kernels: {npu_backend()} ({'real torch_npu' if npu_backend() == 'torch_npu' else 'plain-PyTorch emulation with torch-npu 2.13.0 schemas'})")
    lowered = lower(layer, args.target, phases, block_size=args.block_size, dump_dir=args.dump)
    for phase in phases:
        report = lowered.reports[phase]
        print(f"\n[{args.target} / {phase}] {len(report.records)} passes, {report.seconds * 1e3:.1f} ms")
        print(report.table())
        kernels = ", ".join(f"{op} x{n}" for op, n in report.final_ops.items())
        print(f"ops: {kernels}")
    if args.dump:
        print(f"\ndumps written to {args.dump}/<phase>/")
    if not args.verify:
        return 0
    print("\nverify against the plain definition (random batch per phase):")
    failed = False
    for phase in phases:
        result = compare_with_plain(layer, lowered, phase, seed=args.seed)
        failed |= not result.ok
        print(f"  {phase:8s} max |err| {result.max_abs_error:.3g} (max |out| {result.max_abs_reference:.3g}), "
              f"caches {'equal' if result.cache_equal else 'DIFFER'}: {'ok' if result.ok else 'MISMATCH'}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "block_size", 1) < 1:
        parser.error(f"--block-size must be >= 1, got {args.block_size}")
    try:
        return {"lower": cmd_lower}[args.command](args)
    except ValueError as exc:
        print(f"mla-graph: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

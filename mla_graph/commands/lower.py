"""mla-graph lower: lower one MLA layer, print the pipeline, optionally dump and verify."""
from __future__ import annotations

import argparse
import sys
import time

import torch

from ..capture import ALL_PHASES
from ._common import (DTYPES, EXIT_STATUS, add_model_args, add_target_arg, config_from, phase_label, phases,
                      writable_dir)

HELP = "lower one MLA layer and print the pipeline"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    low = sub.add_parser("lower", help=HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Capture one MLA layer (random weights at the model's dimensions), "
                                     "run the target's pass pipeline per phase and print what each pass did.",
                         epilog=EXIT_STATUS + "\n(lower: 1 when a pass broke an invariant or --verify found a "
                                              "disagreement)")
    add_model_args(low)
    add_target_arg(low)
    low.add_argument("--phase", action="append", choices=list(ALL_PHASES) + ["all"],
                     help="phase to lower; repeat for several (default and 'all': prefill, decode, mixed; "
                        "multi_decode when named)")
    low.add_argument("--dump", metavar="DIR", help="write numbered per-pass dumps to DIR/<phase>/")
    low.add_argument("--verify", action="store_true",
                     help="run a random batch of each phase through the plain definition and the lowered "
                          "module, in checked mode (each call's metadata and positions are checked before "
                          "anything is written), and compare outputs and caches (exit 1 on disagreement)")
    low.add_argument("--seed", type=int, default=0, help="seed for weights and inputs")
    return low


def run(args: argparse.Namespace) -> int:
    from mla_graph.passes import PassVerificationError

    from ..attention import MLAAttention
    from ..checking import compare_with_plain
    from ..lowering import lower

    config = config_from(args)
    if args.dump:
        writable_dir(args.dump, "--dump")
    dtype = DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    layer = MLAAttention(config, dtype=dtype, tp_size=args.tp_size).requires_grad_(False)
    print(f"{config.name}: hidden {config.hidden_size}, heads {layer.num_heads}"
          f"{f' of {config.num_heads} (tp {args.tp_size})' if args.tp_size > 1 else ''}, "
          f"q_lora {config.q_lora_rank}, kv_lora {config.kv_lora_rank}, {args.dtype}; "
          f"weights built in {time.perf_counter() - start:.1f}s", flush=True)
    selected = phases(args.phase)
    if args.target == "npu":
        from ..npu import npu_backend
        print(f"npu kernels: {npu_backend()} ({'real torch_npu' if npu_backend() == 'torch_npu' else 'plain-PyTorch emulation with torch-npu 2.13.0 schemas'})")
    try:
        lowered = lower(layer, args.target, selected, block_size=args.block_size, dump_dir=args.dump,
                        checked=True if args.verify else None)
    except PassVerificationError as exc:
        where = f"\ndumps up to that pass are in {args.dump}/<phase>/" if args.dump else ""
        print(f"mla-graph: error: {exc}{where}", file=sys.stderr)
        return 1
    for phase in selected:
        report = lowered.reports[phase]
        print(f"\n[{phase_label(args.target, phase)}] {len(report.records)} passes, {report.seconds * 1e3:.1f} ms")
        print(report.table())
        kernels = ", ".join(f"{op} x{n}" for op, n in report.final_ops.items())
        print(f"ops: {kernels}")
    if args.dump:
        print(f"\ndumps written to {args.dump}/<phase>/")
    if not args.verify:
        return 0
    print("\nverify against the plain definition (random batch per phase, checked mode):", flush=True)
    failed = []
    for phase in selected:
        try:
            result = compare_with_plain(layer, lowered, phase, seed=args.seed)
        except (ValueError, RuntimeError) as exc:   # a check of checked mode, or the lowered module failing
            failed.append(phase)
            print(f"  {phase:8s} FAILED: {type(exc).__name__}: {exc}", flush=True)
            continue
        if not result.ok:
            failed.append(phase)
        print(f"  {phase:8s} max |err| {result.max_abs_error:.3g} (max |out| {result.max_abs_reference:.3g}), "
              f"caches {'equal' if result.cache_equal else 'DIFFER'}: {'ok' if result.ok else 'MISMATCH'}",
              flush=True)
    if failed:
        print(f"mla-graph: verification failed for {', '.join(failed)}: the lowered module disagrees with the "
              f"plain definition (see above)", file=sys.stderr)
        return 1
    return 0

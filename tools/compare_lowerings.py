"""Compare the graphs this checkout lowers with another commit's, and what lowering costs in each.

    python tools/compare_lowerings.py --against <commit> [--out comparison.json]

Checks out <commit> into a temporary git worktree and, in a fresh interpreter per tree (the tree
first on sys.path, so its own mla_graph and passes are imported), lowers the matrix every refactor
must leave as it was: the test configs V3_TINY, V2_LITE_TINY, V3_NPU and V2_LITE_NPU
(tests/conftest.py) x bf16 / fp32 x tensor parallel 1 / 2 x every target x every phase. Prints how
many graphs are identical as text (gm.code) and the first difference, then the CPU time of lowering
each target (V3_NPU and V2_LITE_NPU, bf16, best of --repeat), the two trees interleaved --rounds
times, and the Python function calls of lowering every target once (cProfile: the work done,
which the machine's timing noise does not blur); writes all of it to --out.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent

CHILD = r'''
import json, sys, time
tree, what, repeat = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path[:0] = [tree, tree + "/tests"]
import torch
import mla_graph
assert mla_graph.__file__.startswith(tree), f"imported {mla_graph.__file__}, not the tree's"
from conftest import V2_LITE_NPU, V2_LITE_TINY, V3_NPU, V3_TINY
from mla_graph import MLAAttention, lower
from mla_graph.targets import TARGETS
out = {}
if what == "graphs":
    for name, config in (("v3tiny", V3_TINY), ("v2tiny", V2_LITE_TINY), ("v3npu", V3_NPU), ("v2npu", V2_LITE_NPU)):
        for dtype in (torch.bfloat16, torch.float32):
            for tp in (1, 2):
                torch.manual_seed(0)
                layer = MLAAttention(config, dtype=dtype, tp_size=tp, tp_rank=0)
                for target in TARGETS:
                    lowered = lower(layer, target, block_size=128 if "npu" in name else 16)
                    for phase, gm in lowered.graphs.items():
                        out[f"{name}/{dtype}/tp{tp}/{target}/{phase}"] = gm.code
else:
    layers = [MLAAttention(config, dtype=torch.bfloat16) for config in (V3_NPU, V2_LITE_NPU)]
    for layer in layers:
        lower(layer, "torchair", block_size=128)      # imports and registrations, once
    for _ in range(repeat):
        for target in TARGETS:
            start = time.process_time()
            for layer in layers:
                lower(layer, target, block_size=128)
            out[target] = min(out.get(target, float("inf")), time.process_time() - start)
    import cProfile, pstats
    profile = cProfile.Profile()
    profile.enable()
    for target in TARGETS:
        for layer in layers:
            lower(layer, target, block_size=128)
    profile.disable()
    out["python calls"] = pstats.Stats(profile).total_calls   # the work done, free of the machine's noise
print(json.dumps(out))
'''


def run(tree: pathlib.Path, what: str, repeat: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", CHILD, str(tree), what, str(repeat)], capture_output=True,
                          text=True, env=env, cwd=tree)
    if done.returncode != 0:
        raise SystemExit(f"lowering in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", required=True, help="the commit to compare with")
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--repeat", type=int, default=5, help="lowerings per target; the best is kept")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved cost measurements per tree")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        other = pathlib.Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(other), args.against],
                       check=True, capture_output=True)
        try:
            print(f"lowering the matrix at {args.against} and here ...", file=sys.stderr)
            before, after = run(other, "graphs", 1), run(ROOT, "graphs", 1)
            differ = sorted(k for k in before if before[k] != after.get(k))
            missing = sorted(set(before) ^ set(after))
            print(f"graphs: {len(before) - len(differ)} of {len(before)} identical as text"
                  + (f"; {len(missing)} lowered in one tree only" if missing else ""))
            if differ:
                print(f"first difference, {differ[0]}:")
                print("".join(list(difflib.unified_diff(before[differ[0]].splitlines(True),
                                                        after[differ[0]].splitlines(True)))[:40]))
            costs: dict[str, list] = {"before": [], "after": []}
            for round_ in range(args.rounds):
                print(f"cost, round {round_ + 1} of {args.rounds} ...", file=sys.stderr)
                costs["before"].append(run(other, "cost", args.repeat))
                costs["after"].append(run(ROOT, "cost", args.repeat))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(other)], capture_output=True)
    print(f"{'target':22} {'before s':>10} {'after s':>10}   (CPU time, best of {args.repeat}; median of "
          f"{args.rounds} rounds)")
    for target in costs["before"][0]:
        b = sorted(r[target] for r in costs["before"])[len(costs["before"]) // 2]
        a = sorted(r[target] for r in costs["after"])[len(costs["after"]) // 2]
        print(f"{target:22} {b:10.3f} {a:10.3f}" if target != "python calls" else
              f"{target:22} {b:10d} {a:10d}   (every target once; {100 * (a - b) / b:+.2f}%)")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps({"against": args.against, "graphs": len(before),
                                                      "identical": len(before) - len(differ), "differ": differ,
                                                      "cost": costs}, indent=1))


if __name__ == "__main__":
    main()

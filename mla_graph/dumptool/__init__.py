"""Pass-by-pass dump folders: writing them for the pass manager (folder.py, render.py), and tools over
them: the HTML report, the diff of two dumps, progress display.

A dump folder is what `PassManager(dump_dir=...)` writes per phase (`<root>/<phase>/summary.json`,
numbered `NN-<pass>.before/.after` files), plus `dump.json` when `mla-graph dump` wrote it.
"""
from .diff import DumpDiff, diff_dumps
from .html import REPORT_NAME, build_report, write_report
from .loading import Dump, PhaseDump, load_dump

__all__ = ["REPORT_NAME", "Dump", "DumpDiff", "PhaseDump", "build_report", "diff_dumps", "load_dump",
           "write_report"]

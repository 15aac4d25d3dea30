"""The torchair check as `check` and `dump` run it: one function, one set of options, so both report
the same findings for the same lowered graph."""
from __future__ import annotations

import argparse
import dataclasses

from torch.fx import GraphModule

from ..targets import TARGETS
from ..torchair_compat.report import TorchairReport

# The library's messages name its keyword arguments; what the CLI prints names the CLI's flags.
CLI_WORDS = {"pass static_dims=False": "pass --no-static-dims",
             "--no-toolchain / toolchain=False": "--no-toolchain"}


def add_check_args(p: argparse.ArgumentParser, when: str = "") -> None:
    """--no-static-dims and --no-toolchain; `when` prefixes their help ('with --check-torchair: ')."""
    p.add_argument("--no-static-dims", dest="static_dims", action="store_false",
                   help=f"{when}accept symbolic input sizes (a dynamic GE graph) instead of reporting each as an "
                        "error (a batch bucket's graph has none)")
    p.add_argument("--no-toolchain", dest="toolchain", action="store_const", const=False, default=None,
                   help=f"{when}check against the converter list only, even where the torch-npu wheel is available")


@dataclasses.dataclass
class PhaseCheck:
    report: TorchairReport   # worded for the CLI (flags, not keyword arguments)
    graph: str               # which graph was checked, in words


def check_phase(gm: GraphModule, target: str, phase: str, layer, block_size: int, *, static_dims: bool,
                toolchain: bool | None, graph_mode: bool = True) -> PhaseCheck:
    """Check the graph torchair would be handed for `phase` of `gm` (lowered for `target`). A phase the
    target compiles as a graph per batch bucket (torchair decode) is checked on the smallest bucket's
    static graph; any other on the lowered graph itself, whose symbolic sizes are reported unless
    `static_dims` is False. `graph_mode` False (a pipeline stopped early) checks the lowered graph."""
    runtime = TARGETS[target].runtimes.get(phase) if graph_mode else None
    runner = runtime(gm, TARGETS[target].parse(None)) if runtime is not None else None
    if runner is not None and not runner.on_npu:
        return check_graph(smallest_bucket_graph(runner, layer, block_size),
                           f"the graph the compiler is handed for batch bucket {runner.options.graph_batch_sizes[0]} "
                           f"(AOT-traced, static shapes; node names are the trace's)",
                           static_dims=static_dims, toolchain=toolchain)
    if runner is not None:
        # On an Ascend host torchair compiles the bucket graphs itself and does not hand them back.
        return check_graph(gm, "the lowered graph (torchair compiles one static graph per batch bucket from it "
                               "on this host; its symbolic sizes are not reported)",
                           static_dims=False, toolchain=toolchain)
    sizes = ("symbolic sizes, each reported: --no-static-dims accepts them" if static_dims
             else "symbolic sizes accepted: --no-static-dims")
    return check_graph(gm, f"the lowered graph, run eagerly ({sizes})",
                       static_dims=static_dims, toolchain=toolchain)


def check_graph(gm: GraphModule, graph: str, *, static_dims: bool, toolchain: bool | None) -> PhaseCheck:
    """check_torchair on `gm` (described as `graph`), its report worded for the CLI."""
    from ..torchair_compat import check_torchair
    return PhaseCheck(_in_cli_words(check_torchair(gm, static_dims=static_dims, toolchain=toolchain)), graph)


def smallest_bucket_graph(runner, layer, block_size: int) -> GraphModule:
    """A graph-mode target compiles one static graph per batch bucket: the graph the compiler is
    handed for the smallest bucket (an AOT-traced aten graph), not the symbolic lowered graph.
    The warmup batch is all padding, so the small cache allocated here is never read for data."""
    from ..cache import PagedLatentCache
    cache = PagedLatentCache.allocate(layer.config, 2, block_size, dtype=layer.dtype)
    return runner.warmup(cache, layer.cos_sin, sizes=runner.options.graph_batch_sizes[:1])[0]


def _in_cli_words(report: TorchairReport) -> TorchairReport:
    def words(text: str) -> str:
        for api, flag in CLI_WORDS.items():
            text = text.replace(api, flag)
        return text
    report.findings = [dataclasses.replace(f, message=words(f.message), suggestion=words(f.suggestion))
                       for f in report.findings]
    report.checked = [words(line) for line in report.checked]
    report.not_checked = [words(line) for line in report.not_checked]
    report.toolchain = words(report.toolchain)
    return report

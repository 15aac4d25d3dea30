"""mla-graph check: would torchair's GE graph mode accept this graph? Exit 0 no errors, 1 errors, 2 bad input."""
from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib

import torch
from torch.fx import GraphModule

from ..capture import ALL_PHASES
from ..config import MLAConfig
from ._common import DTYPES, EXIT_STATUS, PRESETS, add_layer_args, add_target_arg, phase_label
from ._torchair import add_check_args, check_graph, check_phase

HELP = "check a lowered graph against torchair's GE converters (and the torch-npu wheel's own checks)"

DESCRIPTION = """\
Check an FX graph against torchair's GE graph mode (torch-npu 2.13.0). Always, against the vendored
converter list: every op needs a real GE converter (no stub or partial one), no atb:: ops, no
index_put, scope_enter/scope_exit paired, static input sizes. Where the torch-npu 2.13.0 wheel is
cached (mla_graph.ascend_toolchain; --no-toolchain turns this off): torchair's own converters build
the GE graph (static graphs only), its ops' input dtypes are checked against the GE IR, the
wheel's meta functions are compared with our fake kernels, and documented kernel limits that
production use contradicts are reported as notes. The output says what was checked ("converter-list
check only" without the wheel) and what only real hardware shows. One row per finding, with its
severity and a suggested replacement. `mla-graph dump --check-torchair` runs the same check, with the
same options, on the same graph.

TARGET_SPEC is one of:
  a preset name (%(presets)s): build the layer with random weights,
      lower --phase for --target and check the graph torchair is handed: for a phase the target
      compiles as a graph per batch bucket (torchair decode), the smallest bucket's static graph;
      otherwise the lowered graph (its symbolic sizes are errors unless --no-static-dims);
  a Hugging Face config.json (or its folder): the same, from that config;
  a Python file (.py) defining build_graph() -> torch.fx.GraphModule: check the graph it returns
      (--target, --phase, --dtype, --tp-size and --block-size do not apply); torch.ops.npu and
      torch.ops.air exist when it runs (emulated where torch_npu is absent).

%(exit)s
(check: findings are error-severity findings; notes never fail the check)"""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("check", help=HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=DESCRIPTION % {"presets": ", ".join(PRESETS), "exit": EXIT_STATUS})
    p.add_argument("spec", metavar="TARGET_SPEC", help="preset name, config.json path, or .py file with build_graph()")
    add_target_arg(p)
    p.add_argument("--phase", choices=list(ALL_PHASES), default="decode", help="phase to lower and check (default decode)")
    add_layer_args(p)
    add_check_args(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    path = pathlib.Path(args.spec)
    if path.suffix == ".py":
        what = f"{path.name}: build_graph()"
        result = check_graph(_graph_from_file(path), "the graph build_graph() returned",
                             static_dims=args.static_dims, toolchain=args.toolchain)
    else:
        config = _config(args.spec)
        what = f"{config.name} / {phase_label(args.target, args.phase)}"
        gm, layer = _lowered_graph(config, args)
        result = check_phase(gm, args.target, args.phase, layer, args.block_size, static_dims=args.static_dims,
                             toolchain=args.toolchain)
    if args.json:
        print(json.dumps({"graph": what, "checked_graph": result.graph, **result.report.to_json()}, indent=2))
    else:
        print(f"{what}:\ngraph: {result.graph}")
        print(result.report.table())
    return 0 if result.report.ok else 1


def _config(spec: str) -> MLAConfig:
    """Raises ValueError (exit 2 through the CLI) for a spec that is none of the accepted kinds."""
    path = pathlib.Path(spec)
    if path.suffix == ".json" or path.is_dir():
        return MLAConfig.from_hf(path)
    if spec not in PRESETS:
        raise ValueError(f"TARGET_SPEC {spec!r} is not a preset ({', '.join(PRESETS)}), a config.json or a .py "
                         "file defining build_graph()")
    return MLAConfig.preset(spec)


def _graph_from_file(path: pathlib.Path) -> GraphModule:
    if not path.is_file():
        raise ValueError(f"{str(path)!r}: no such file; expected a .py file defining build_graph()")
    from ..npu import ensure_npu_ops
    from ..npu.air_ops import ensure_air_ops
    ensure_npu_ops()
    ensure_air_ops()
    spec = importlib.util.spec_from_file_location(f"_mla_graph_check_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:   # the user's file: any failure is bad input, said plainly
        raise ValueError(f"{str(path)!r} failed to import: {type(exc).__name__}: {exc}") from exc
    build = getattr(module, "build_graph", None)
    if not callable(build):
        raise ValueError(f"{str(path)!r} defines no build_graph(); expected a function returning a "
                         "torch.fx.GraphModule")
    try:
        gm = build()
    except Exception as exc:
        raise ValueError(f"build_graph() in {str(path)!r} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(gm, GraphModule):
        raise ValueError(f"build_graph() in {str(path)!r} returned {type(gm).__name__}; expected a "
                         "torch.fx.GraphModule")
    return gm


def _lowered_graph(config: MLAConfig, args: argparse.Namespace) -> tuple[GraphModule, object]:
    """The lowered graph of args.phase, and the layer it was lowered from."""
    from ..attention import MLAAttention
    from ..lowering import lower

    # Only the graph is checked: random weights at the model's dimensions, no numerics run.
    layer = MLAAttention(config, dtype=DTYPES[args.dtype], tp_size=args.tp_size).requires_grad_(False)
    with torch.no_grad():
        lowered = lower(layer, args.target, [args.phase], block_size=args.block_size)
    return lowered.graphs[args.phase], layer

"""mla-graph check: would torchair's GE graph mode accept this graph? Exit 0 no errors, 1 errors, 2 bad input."""
from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib

import torch
from torch.fx import GraphModule

from ..capture import PHASES
from ..config import MLAConfig, preset_names
from ..targets import TARGETS
from ._common import DTYPES

HELP = "check a lowered graph against torchair's GE converters (and the torch-npu wheel's own checks)"
DEFAULT_TARGET = "torchair" if "torchair" in TARGETS else "npu"

DESCRIPTION = """\
Check an FX graph against torchair's GE graph mode (torch-npu 2.13.0). Always, against the vendored
converter list: every op needs a real GE converter (no stub or partial one), no atb:: ops, no
index_put, scope_enter/scope_exit paired, static input sizes. Where the torch-npu 2.13.0 wheel is
cached (mla_graph.ascend_toolchain; --no-toolchain turns this off): torchair's own converters build
the GE graph (static graphs only), its ops' input dtypes are checked against the GE IR, the
wheel's meta functions are compared with our fake kernels, and documented kernel limits that
production use contradicts are reported as notes. The output says what was checked ("converter-list
check only" without the wheel) and what only real hardware shows. One row per finding, with its
severity and a suggested replacement.

TARGET_SPEC is one of:
  a preset name (%(presets)s): build the layer with random weights, lower
      --phase for --target and check that graph;
  a Hugging Face config.json (or its folder): the same, from that config;
  a Python file (.py) defining build_graph() -> torch.fx.GraphModule: check the graph it returns
      (--target, --phase, --dtype, --tp-size and --block-size do not apply); torch.ops.npu and
      torch.ops.air exist when it runs (emulated where torch_npu is absent).

Exit status: 0 no error findings (notes allowed), 1 error findings, 2 bad input."""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("check", help=HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=DESCRIPTION % {"presets": ", ".join(preset_names())})
    p.add_argument("spec", metavar="TARGET_SPEC", help="preset name, config.json path, or .py file with build_graph()")
    p.add_argument("--target", choices=sorted(TARGETS), default=DEFAULT_TARGET,
                   help=f"lowering target for a preset or config (default {DEFAULT_TARGET})")
    p.add_argument("--phase", choices=list(PHASES), default="decode", help="phase to lower and check (default decode)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weight dtype (default bf16)")
    p.add_argument("--tp-size", type=int, default=1,
                   help="tensor-parallel size: the layer holds num_heads/tp_size heads")
    p.add_argument("--block-size", type=int, default=128, help="paged cache block size (default 128)")
    p.add_argument("--no-static-dims", dest="static_dims", action="store_false",
                   help="accept symbolic input sizes (a dynamic GE graph) instead of reporting them")
    p.add_argument("--no-toolchain", dest="toolchain", action="store_const", const=False, default=None,
                   help="check against the converter list only, even where the torch-npu wheel is available")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    from ..torchair_compat import check_torchair

    gm, what, bucketed = _graph(args)
    # On an Ascend host torchair compiles the bucketed graph itself and does not hand it back, so
    # the lowered graph is checked; its batch sizes are symbolic and become static per bucket.
    report = check_torchair(gm, static_dims=args.static_dims and not bucketed, toolchain=args.toolchain)
    if args.json:
        print(json.dumps({"graph": what, **report.to_json()}, indent=2))
    else:
        print(f"{what}:")
        print(report.table())
    return 0 if report.ok else 1


def _graph(args: argparse.Namespace) -> tuple[GraphModule, str, bool]:
    """Raises ValueError (exit 2 through the CLI) for a spec that is none of the accepted kinds."""
    path = pathlib.Path(args.spec)
    if path.suffix == ".py":
        return _graph_from_file(path), f"{path.name}: build_graph()", False
    if path.suffix == ".json" or path.is_dir():
        config = MLAConfig.from_hf(path)
    else:
        try:
            config = MLAConfig.preset(args.spec)
        except ValueError:
            raise ValueError(f"TARGET_SPEC {args.spec!r} is not a preset ({', '.join(preset_names())}), a "
                             "config.json or a .py file defining build_graph()") from None
    gm, bucketed = _lowered_graph(config, args)
    return gm, f"{config.name} / {args.target} / {args.phase}", bucketed


def _graph_from_file(path: pathlib.Path) -> GraphModule:
    if not path.is_file():
        raise ValueError(f"{str(path)!r}: no such file; expected a .py file defining build_graph()")
    from ..npu import ensure_npu_ops
    from ..torchair_compat import ensure_air_ops
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


def _lowered_graph(config: MLAConfig, args: argparse.Namespace) -> tuple[GraphModule, bool]:
    """The graph to check, and whether its batch dims are left symbolic for per-bucket compiles."""
    from ..attention import MLAAttention
    from ..lowering import lower

    # Only the graph is checked: random weights at the model's dimensions, no numerics run.
    layer = MLAAttention(config, dtype=DTYPES[args.dtype], tp_size=args.tp_size).requires_grad_(False)
    with torch.no_grad():
        lowered = lower(layer, args.target, [args.phase], block_size=args.block_size)
    runner = lowered.runners.get(args.phase)
    if runner is None or not hasattr(runner, "warmup"):
        return lowered.graph_for(args.phase), False
    if runner.on_npu:
        return lowered.graph_for(args.phase), True
    return smallest_bucket_graph(runner, layer, args.block_size), False


def smallest_bucket_graph(runner, layer, block_size: int) -> GraphModule:
    """A graph-mode target compiles one static graph per batch bucket: the graph the compiler is
    handed for the smallest bucket (an AOT-traced aten graph), not the symbolic lowered graph.
    The warmup batch is all padding, so the small cache allocated here is never read for data."""
    from ..cache import PagedLatentCache
    cache = PagedLatentCache.allocate(layer.config, 2, block_size, dtype=layer.dtype)
    return runner.warmup(cache, layer.cos_sin, sizes=runner.options.graph_batch_sizes[:1])[0]

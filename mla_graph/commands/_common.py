"""Arguments, defaults and checks shared by the subcommands: the one place their lists and defaults live."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from ..capture import PHASES
from ..config import MLAConfig, preset_names
from ..targets import TARGETS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Every subcommand that takes a model accepts these names (aliases included: deepseek-r1 is V3's MLA).
PRESETS = preset_names(aliases=True)
# --target's default for every subcommand: the production pipeline (decode compiled as a graph per batch
# bucket, other phases eager), and the one `check` is about.
DEFAULT_TARGET = "torchair"
# Exit status, the same for every subcommand.
EXIT_STATUS = ("exit status: 0 clean; 1 findings (a check or a verification failed, the dumps differ);\n"
               "2 usage error (bad arguments, unreadable input, unwritable output)")


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--preset | --hf-config, then the layer's --dtype, --tp-size, --block-size."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=PRESETS, help="a built-in model configuration")
    src.add_argument("--hf-config", metavar="PATH", help="a Hugging Face config.json (or its folder)")
    add_layer_args(p)


def add_layer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weight dtype (default bf16)")
    p.add_argument("--tp-size", type=positive_int, default=1,
                   help="tensor-parallel size: the layer holds num_heads/tp_size heads (default 1)")
    p.add_argument("--block-size", type=positive_int, default=128, help="paged cache block size (default 128)")


def add_target_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", choices=sorted(TARGETS), default=DEFAULT_TARGET,
                   help=f"lowering target (default {DEFAULT_TARGET})")


def phases(values: list[str] | None) -> list[str]:
    if not values or "all" in values:
        return list(PHASES)
    return values


def config_from(args: argparse.Namespace) -> MLAConfig:
    return MLAConfig.preset(args.preset) if args.preset else MLAConfig.from_hf(args.hf_config)


def phase_label(target: str, phase: str) -> str:
    """'npu / decode', or, for a phase a graph-mode target leaves to an eager target's pipeline, which
    one ran: 'torchair / prefill: the npu pipeline, run eagerly (torchair compiles only decode and
    multi_decode as graphs)'."""
    spec = TARGETS[target]
    if not spec.runtimes or phase in spec.runtimes:
        return f"{target} / {phase}"
    names = _pass_names(target, phase)
    same = next((other for other, o in TARGETS.items() if not o.runtimes and _pass_names(other, phase) == names),
                None)
    ran = f"the {same} pipeline" if same else "its eager pipeline"
    graphs = " and ".join(spec.runtimes)
    return f"{target} / {phase}: {ran}, run eagerly ({target} compiles only {graphs} as graphs)"


def _pass_names(target: str, phase: str) -> list[str]:
    from mla_graph.passes import pass_name
    return [pass_name(fn) for fn in TARGETS[target].pipeline(phase)]


def writable_dir(path: str, flag: str) -> Path:
    """Create the folder `path` (and its parents) and prove a file can be written in it, before any
    work starts: a late failure would lose the work. ValueError (exit 2) says which flag, which path,
    why, and what to do."""
    folder = Path(path)
    existed = folder.is_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except FileExistsError:
        raise ValueError(f"{flag} {path}: exists and is not a folder; pass a folder (new or existing)") from None
    except NotADirectoryError:
        blocker = next((p for p in folder.parents if p.exists() and not p.is_dir()), folder.parent)
        raise ValueError(f"{flag} {path}: {blocker} is a file, not a folder; pass a path whose parents are "
                         f"folders") from None
    except OSError as exc:
        raise ValueError(f"{flag} {path}: cannot {'write in' if existed else 'create'} it ({exc.strerror}); "
                         f"pass a folder you can write to") from None
    return folder

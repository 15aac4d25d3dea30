"""The `mla-graph` command line. Each subcommand is a module in mla_graph/commands/ with
`register(subparsers)` and `run(args) -> int`; they are found by name, so adding a command
touches no other file."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from . import commands


def _command_modules() -> dict:
    names = sorted(m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_"))
    return {name: importlib.import_module(f"{commands.__name__}.{name}") for name in names}


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="mla-graph", description=(
        "Lower DeepSeek Multi-head Latent Attention, written once as an FX graph, through passes."))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = _command_modules()
    for module in modules.values():
        module.register(sub)
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "block_size", 1) < 1:
        parser.error(f"--block-size must be >= 1, got {args.block_size}")
    try:
        return modules[args.command].run(args)
    except ValueError as exc:
        print(f"mla-graph: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The `mla-graph` command line. Each subcommand is a module in mla_graph/commands/ with
`register(subparsers)` and `run(args) -> int`; they are found by name, so adding a command
touches no other file. Shared arguments, defaults and the exit status live in commands/_common.py."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from . import commands
from .commands._common import EXIT_STATUS


def _command_modules() -> dict:
    names = sorted(m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_"))
    return {name: importlib.import_module(f"{commands.__name__}.{name}") for name in names}


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="mla-graph", epilog=EXIT_STATUS,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, description=(
        "Lower DeepSeek Multi-head Latent Attention, written once as an FX graph, through passes."))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = _command_modules()
    for module in modules.values():
        module.register(sub)
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    from mla_graph.passes import PassVerificationError

    parser, modules = build_parser()
    args = parser.parse_args(argv)
    try:
        return modules[args.command].run(args)
    except ValueError as exc:     # bad input, said plainly by the code that found it
        print(f"mla-graph: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:        # a file that vanished or a disk that filled after the up-front checks
        print(f"mla-graph: error: cannot read or write {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except PassVerificationError as exc:
        print(f"mla-graph: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mla-graph: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

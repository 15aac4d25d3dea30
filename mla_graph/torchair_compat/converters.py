"""The vendored lists of torchair GE converters (mla_graph/data/ge_converters-<torch-npu release>.txt).

One registered target per line, 'ns.op.overload' for torch.ops.ns.op.overload, 'ns.op' for a
packet, the Python expression otherwise ('operator.add'); an optional tag '[stub]' (the converter
raises at once) or '[partial]' (it raises NotImplementedError for some arguments). The header
line '# torch-npu: X' names the wheel it was read from. tools/sync_ge_converters.py writes it.
"""
from __future__ import annotations

import functools
import importlib.resources
import types
from dataclasses import dataclass

import torch

KINDS = ("real", "partial", "stub")   # most to least capable


@dataclass(frozen=True)
class ConverterTable:
    version: str
    kinds: dict[str, str]   # target key -> "real" | "partial" | "stub"

    def kind(self, key: str) -> str | None:
        """The converter kind of a target key, None when torchair registers no converter for it."""
        return self.kinds.get(key)

    def real_overloads(self, packet: str) -> list[str]:
        """Overloads of 'ns.op' that have a real converter (e.g. to suggest aten.copy_.default)."""
        return sorted(k for k, v in self.kinds.items() if v == "real" and k.rsplit(".", 1)[0] == packet)


def parse_table(text: str) -> ConverterTable:
    version, kinds = "", {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("# torch-npu:"):
            version = line.split(":", 1)[1].strip()
        if not line or line.startswith("#"):
            continue
        key, _, tag = line.partition("  [")
        kind = tag.removesuffix("]") if tag else "real"
        if kind not in KINDS or not key.strip():
            raise ValueError(f"converter list line {number}: {raw!r}; expected 'ns.op.overload' with an "
                             f"optional '  [stub]' or '  [partial]' tag")
        kinds[key.strip()] = kind
    if not version:
        raise ValueError("converter list has no '# torch-npu: <version>' header line")
    return ConverterTable(version, kinds)


def render_table(header: str, kinds: dict[str, str]) -> str:
    """The file text: `header` (comment lines, ending with '# torch-npu: X') then sorted targets."""
    lines = [key if kind == "real" else f"{key}  [{kind}]" for key, kind in sorted(kinds.items())]
    return header + "\n".join(lines) + "\n"


def table_name(release: str) -> str:
    """The vendored table's file name under mla_graph/data for a torch-npu release."""
    return f"ge_converters-{release}.txt"


@functools.cache
def load_converters(release: str | None = None) -> ConverterTable:
    """The vendored table of `release` (default: the running torch's torch-npu, mla_graph.stacks)."""
    from ..stacks import torch_npu_release
    release = release or torch_npu_release()
    path = importlib.resources.files("mla_graph").joinpath("data", table_name(release))
    if not path.is_file():
        raise FileNotFoundError(f"no vendored torchair converter table for torch-npu {release} (mla_graph/data/"
                                f"{table_name(release)}); regenerate it with tools/sync_ge_converters.py --wheel")
    return parse_table(path.read_text())


def target_keys(target: object) -> list[str]:
    """The keys under which torchair may have registered a converter for an FX call target."""
    if isinstance(target, torch._ops.OpOverload):
        return [str(target)]
    if isinstance(target, torch._ops.HigherOrderOperator):
        return [f"higher_order.{target.name()}"]
    name = getattr(target, "__name__", None)
    if name is None:
        return []
    module = getattr(target, "__module__", None) or ""
    module = "operator" if module == "_operator" else module
    return [f"{module}.{name}", name] if module else [name]


def is_host_builtin(target: object) -> bool:
    """operator.getitem and other Python builtins: torchair evaluates them on the host (no converter)."""
    return isinstance(target, types.BuiltinFunctionType)

"""Loading the wheel's torchair and torch-npu checks once per process: load(), available(), status()."""
from __future__ import annotations

import importlib.util
import pathlib
import sys
import time
import types
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..npu import ensure_npu_ops, npu_backend
from ..npu.air_ops import ensure_air_ops
from .ge_registry import GeInputSpec, parse_ge_ops
from .torchair_import import define_npu_schemas, import_torchair
from ..stacks import current, release_line, torch_npu_release
from .wheel import (TYPES_H, ToolchainUnavailable, cache_dir, extract, find_wheel, required_torch, requirement,
                    wheel_release)


@dataclass
class Toolchain:
    wheel: pathlib.Path
    root: pathlib.Path                      # the unpacked parts of the wheel
    torchair: types.ModuleType
    npu_library: torch.library.Library      # holds the schema-only npu:: ops; must stay alive
    npu_schemas_defined: int                # npu:: ops defined from the YAML (ours not counted)
    npu_schemas_failed: dict[str, str]      # {op: why torch.library refused its schema}
    converter_import_failures: list[str]    # torchair's own "Failed to import ..." warnings
    kept_out: list[str]                     # torchair registrations skipped to keep our ops
    load_seconds: float
    _ge_ops: dict[str, dict[str, GeInputSpec]] | None = field(default=None, repr=False)
    _meta: dict[str, Callable] | None = field(default=None, repr=False)

    @property
    def release(self) -> str:
        """The torch-npu release whose toolchain this is ('2.13.0', '2.10.0.post4')."""
        return wheel_release(self.wheel)

    @property
    def torch_npu_dir(self) -> pathlib.Path:
        return self.root / "torch_npu"

    def ge_ops(self) -> dict[str, dict[str, GeInputSpec]]:
        """{GE op type: {input: GeInputSpec}} from the IR registry (parsed on first use)."""
        if self._ge_ops is None:
            raw_ops = self.torch_npu_dir / "dynamo/torchair/_ge_concrete_graph/auto_generated_ge_raw_ops.py"
            self._ge_ops = parse_ge_ops(raw_ops.read_text(), (self.root / TYPES_H).read_text())
        return self._ge_ops

    def meta_functions(self) -> dict[str, Callable]:
        """{'npu::npu_rms_norm': python function, ...}: the wheel's meta functions (loaded on first use)."""
        if self._meta is None:
            from .meta_loader import load_meta_functions
            self._meta = load_meta_functions(self.torch_npu_dir / "op_plugin/meta/_meta_registrations.py")
        return self._meta

    def describe(self) -> str:
        return (f"torch-npu {self.release} wheel at {self.wheel}: torchair loaded in {self.load_seconds:.1f} s, "
                f"{self.npu_schemas_defined} npu:: schemas defined from the YAML, "
                f"{len(self.converter_import_failures)} converter files skipped by torchair")


_LOADED: list[Toolchain] = []
_FAILED: list[str] = []


def load(wheel: pathlib.Path | str | None = None) -> Toolchain:
    """Load the toolchain from `wheel` (default: the cached one), once per process.

    Raises ToolchainUnavailable with the reason when there is no wheel, when a real torch_npu is
    importable (use it directly), or when importing torchair failed (later calls repeat the reason)."""
    if _LOADED:
        loaded = _LOADED[0]
        if wheel is not None and pathlib.Path(wheel).resolve() != loaded.wheel.resolve():
            raise ValueError(f"the toolchain is already loaded from {loaded.wheel}; torchair imports once per "
                             f"process, so it cannot be reloaded from {wheel}")
        return loaded
    if _FAILED:
        raise ToolchainUnavailable(_FAILED[0])
    path = _locate(wheel)
    started = time.perf_counter()
    root = extract(path)
    ensure_npu_ops()
    ensure_air_ops()
    library, defined, failed = define_npu_schemas(root / "torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml")
    try:
        torchair, skipped_files, kept_out = import_torchair(root / "torch_npu" / "dynamo")
    except Exception as error:  # any import-time failure of a 3rd-party package makes the toolchain unusable
        _FAILED.append(f"importing torchair from {root} failed: {type(error).__name__}: {error}")
        raise ToolchainUnavailable(_FAILED[0]) from error
    _LOADED.append(Toolchain(path, root, torchair, library, defined, failed, skipped_files, kept_out,
                             time.perf_counter() - started))
    return _LOADED[0]


def _locate(wheel: pathlib.Path | str | None) -> pathlib.Path:
    if npu_backend() == "torch_npu":
        raise ToolchainUnavailable("a real torch_npu imports on this host; use its torchair and meta functions "
                                   "directly instead of the wheel's copies")
    missing = [package for package, module in (("protobuf", "google.protobuf"), ("pyyaml", "yaml"))
               if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None]
    if missing:
        raise ToolchainUnavailable(f"torchair needs {' and '.join(missing)}; pip install {' '.join(missing)}")
    spec = importlib.util.find_spec("torchair") if "torchair" not in sys.modules else None
    if spec is not None:
        raise ToolchainUnavailable(f"another torchair is importable from {spec.origin}; it would shadow the wheel's")
    path = pathlib.Path(wheel) if wheel is not None else find_wheel()
    if path is None:
        raise ToolchainUnavailable(f"no {requirement()} wheel in {cache_dir()}; call fetch_wheel() (pip download) "
                                   f"or set MLA_GRAPH_CACHE to the folder holding it")
    if not path.is_file():
        raise ToolchainUnavailable(f"wheel {path} does not exist; expected a torch_npu-{torch_npu_release()}-*.whl file")
    built_for = required_torch(path)
    if built_for is not None and release_line(built_for) != current().torch:
        # torchair's converter package skips a file at its first AttributeError: another torch's
        # aten overloads would silently drop the converters after it
        raise ToolchainUnavailable(f"{path.name} is torch-npu {wheel_release(path)}, built for torch {built_for}, but "
                                   f"this is torch {torch.__version__}; its torchair would load only in part. Use "
                                   f"the torch-npu {torch_npu_release()} wheel (fetch_wheel())")
    return path


def available() -> bool:
    """Whether load() can succeed here, without loading anything."""
    return bool(_LOADED) or (not _FAILED and _unavailable_reason() is None)


def status() -> str:
    """'torch-npu RELEASE wheel at PATH ...' or why the toolchain is unavailable."""
    if _LOADED:
        return _LOADED[0].describe()
    reason = _FAILED[0] if _FAILED else _unavailable_reason()
    return reason or f"torch-npu {torch_npu_release()} wheel at {find_wheel()} (not loaded yet)"


def _unavailable_reason() -> str | None:
    try:
        _locate(None)
    except ToolchainUnavailable as error:
        return str(error)
    return None

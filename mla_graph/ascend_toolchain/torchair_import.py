"""Import the wheel's torchair on a host without CANN, leaving our emulated ops in charge.

Three things stand in the way, each handled here:
- four extension modules link CANN: inert stand-ins take their place in sys.modules;
- torchair registers converters for npu:: ops at import and silently skips a file whose op is
  undefined: every npu:: schema from the wheel's YAML is defined first (schema only, no kernel);
- torchair defines air:: ops and registers kernels for them (the air FIA's CPU kernel raises):
  while it imports, defining or registering a kernel for an op that already exists is skipped.
"""
from __future__ import annotations

import contextlib
import importlib
import pathlib
import sys
import types
import warnings
from collections.abc import Iterator

import torch

CANN_EXTENSIONS = ("_torchair", "_npu_graph_executor", "_npu_utils", "_abi_compat_ge_apis")
# Imported explicitly: torchair.ops and torchair.scope load them only on first use, and they hold
# the converters for air::npu_fused_infer_attention_score and air::wait_tensor. (The _v2 FIA
# module imports torch_npu itself, so air::npu_fused_infer_attention_score_v2 stays unconverted.)
LAZY_MODULES = ("torchair.ops._npu_fused_infer_attention_score", "torchair.scope._wait_tensor",
                "torchair._ge_concrete_graph.ge_converter.custom")


class _InertMeta(type):
    """Classes whose every attribute is another inert class: torchair subclasses
    `_torchair.TorchNpuGraphBase`, reads `_torchair.TorchDataType.BOOL`, calls
    `_torchair.FinalizeGraphEngine()` at exit."""

    def __getattr__(cls, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return _inert(name)


def _inert(name: str) -> type:
    return _InertMeta(name, (), {"__init__": lambda self, *a, **k: None, "__call__": lambda self, *a, **k: None})


class _CannStandIn(types.ModuleType):
    def __getattr__(self, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        cls = _inert(name)
        setattr(self, name, cls)
        return cls


def _op_exists(qualname: str) -> bool:
    name, _, overload = qualname.partition(".")
    try:
        torch._C._get_schema(name, overload)
    except RuntimeError:
        return False
    return True


def define_npu_schemas(yaml_path: pathlib.Path) -> tuple[torch.library.Library, int, dict[str, str]]:
    """Define every npu:: op of the YAML's `custom` section that is not defined yet, schema only.

    The `symint` section's form replaces the `custom` one of the same name (torch-npu's codegen does
    the same: FIA takes SymInt[] lengths). `supported`, `quant` and `autograd` list aten ops, which
    torchair converts through torch.ops.aten, so they are not defined here.
    Returns the library (keep it alive), how many were defined, and {name: why not} for failures."""
    import yaml   # pyyaml: checked by toolchain.load() before this runs

    sections = yaml.safe_load(yaml_path.read_text())
    schemas = {}
    for section in ("custom", "symint"):
        for entry in sections.get(section) or []:
            func = entry.get("func", "") if isinstance(entry, dict) else ""
            if "(" in func and (section == "custom" or func.split("(")[0] in schemas):
                schemas[func.split("(")[0]] = func
    library = torch.library.Library("npu", "FRAGMENT")
    defined, failed = 0, {}
    for name, schema in schemas.items():
        if _op_exists(f"npu::{name}"):
            continue
        try:
            library.define(schema)
            defined += 1
        except RuntimeError as error:
            failed[name] = str(error).splitlines()[0]
    return library, defined, failed


def _qualname(library: torch.library.Library, op_name: object) -> str:
    if isinstance(op_name, torch._ops.OpOverload):   # the default overload's schema name is ""
        overload = "" if op_name._overloadname == "default" else f".{op_name._overloadname}"
        return f"{op_name._schema.name}{overload}"
    text = str(op_name)
    return text if "::" in text else f"{library.ns}::{text}"


@contextlib.contextmanager
def keep_existing_ops() -> Iterator[list[str]]:
    """While active, Library.define / Library.impl (and so torch.library.impl) skip ops that
    existed before: our emulated air:: and npu:: ops keep their schemas and kernels. Yields the
    list of what was skipped."""
    define, impl = torch.library.Library.define, torch.library.Library.impl
    new_ops: set[str] = set()
    skipped: list[str] = []

    def guarded_define(self, schema, *args, **kwargs):
        qualname = f"{self.ns}::{schema.strip().split('(')[0].strip()}"
        if _op_exists(qualname):
            skipped.append(f"define {qualname}")
            return qualname.split("::")[1]
        new_ops.add(qualname.split(".")[0])
        return define(self, schema, *args, **kwargs)

    def guarded_impl(self, op_name, fn, dispatch_key="", *args, **kwargs):
        qualname = _qualname(self, op_name)
        if qualname.split(".")[0] not in new_ops and _op_exists(qualname):
            skipped.append(f"impl {qualname} [{dispatch_key}]")
            return None
        return impl(self, op_name, fn, dispatch_key, *args, **kwargs)

    torch.library.Library.define, torch.library.Library.impl = guarded_define, guarded_impl
    try:
        yield skipped
    finally:
        torch.library.Library.define, torch.library.Library.impl = define, impl


def import_torchair(dynamo_dir: pathlib.Path) -> tuple[types.ModuleType, list[str], list[str]]:
    """Import torchair from `dynamo_dir` (the wheel's torch_npu/dynamo). Returns the module, the
    converter files torchair skipped (with its reason) and the registrations kept out."""
    for name in CANN_EXTENSIONS:
        sys.modules.setdefault(f"torchair.core.{name}", _CannStandIn(f"torchair.core.{name}"))
    if str(dynamo_dir) not in sys.path:
        sys.path.append(str(dynamo_dir))   # toolchain.load() checked that no other torchair is importable
    with warnings.catch_warnings(record=True) as caught, keep_existing_ops() as skipped:
        warnings.simplefilter("always")
        torchair = importlib.import_module("torchair")
        for name in LAZY_MODULES:
            importlib.import_module(name)
    failed = sorted(str(w.message) for w in caught if str(w.message).startswith("Failed to import"))
    return torchair, failed, skipped

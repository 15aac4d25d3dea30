"""torchair's own air:: ops, registered here when torchair is absent.

torchair defines them when torchair.scope is imported (torch-npu 2.13.0, torchair/scope/_scope.py
and _wait_tensor.py). A graph for the torchair target carries them on any host, so elsewhere we
register the same schemas with host kernels: the scope markers do nothing (they only stamp
attributes on GE nodes) and wait_tensor is an identity (on the NPU it is an Identity with a
control edge on `dependency`).
"""
from __future__ import annotations

import importlib

import torch
from torch.fx.node import has_side_effect

from ..npu import npu_backend

AIR_SCHEMAS: dict[str, str] = {   # as torchair 2.13.0 defines them
    "scope_enter": "scope_enter(str[] keys, str[] values, bool need_execute=False) -> None",
    "scope_exit": "scope_exit(bool need_execute=False) -> None",
    "wait_tensor": "wait_tensor(Tensor self, Tensor dependency) -> Tensor",
}
_LIBRARY: list[torch.library.Library] = []


def _scope_enter(keys: list[str], values: list[str], need_execute: bool = False) -> None:
    if len(keys) != len(values):
        raise ValueError(f"air.scope_enter: {len(keys)} keys but {len(values)} values; expected one value per key")


def _scope_exit(need_execute: bool = False) -> None:
    return None


def _wait_tensor(self: torch.Tensor, dependency: torch.Tensor) -> torch.Tensor:
    return self.clone()   # the schema returns a new tensor, not an alias of `self`


def _wait_tensor_fake(self: torch.Tensor, dependency: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(self)


def ensure_air_ops() -> str:
    """Make torch.ops.air.scope_enter / scope_exit / wait_tensor exist; return who defines them:
    "torchair" (real torchair, on a torch_npu host, or already registered by someone else in this
    process) or "emulated" (registered here)."""
    if all(hasattr(torch.ops.air, name) for name in AIR_SCHEMAS):
        return "emulated" if _LIBRARY else "torchair"
    if npu_backend() == "torch_npu":
        # torch_npu installs torchair as a lazy top-level module; scope defines the markers on import,
        # _wait_tensor is otherwise loaded only on the first npu_wait_tensor call.
        importlib.import_module("torchair.scope")
        importlib.import_module("torchair.scope._wait_tensor")
        return "torchair"
    existing = [name for name in AIR_SCHEMAS if hasattr(torch.ops.air, name)]
    if existing:
        raise RuntimeError(f"torch.ops.air defines {existing} but not all of {list(AIR_SCHEMAS)}; "
                           "something registered part of torchair's air:: ops")
    library = torch.library.Library("air", "FRAGMENT")
    kernels = {"scope_enter": (_scope_enter, None), "scope_exit": (_scope_exit, None),
               "wait_tensor": (_wait_tensor, _wait_tensor_fake)}
    for name, schema in AIR_SCHEMAS.items():
        library.define(schema)
        kernel, fake = kernels[name]
        library.impl(name, kernel, "CompositeExplicitAutograd")
        if fake is not None:
            torch.library.register_fake(f"air::{name}", fake, lib=library)
    # Like torchair: the markers return nothing, so without this dead-code elimination drops them.
    has_side_effect(torch.ops.air.scope_enter.default)
    has_side_effect(torch.ops.air.scope_exit.default)
    _LIBRARY.append(library)
    return "emulated"

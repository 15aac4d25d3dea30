"""Registration of the emulated npu:: and atb:: ops on hosts without torch_npu.

Nothing registers at import time: callers opt in with ensure_npu_ops(), so
importing mla_graph never shadows a real torch_npu's kernels.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Callable

import torch

from mla_graph.npu import atb_attention, fia_ops, formats, kv_cache_ops, mla_prolog, rope_norm, scatter_ops
from mla_graph.npu.schemas import ATB_SCHEMAS, NPU_SCHEMAS

EMULATED_SCHEMAS: dict[str, str] = {
    **{f"npu::{name}": schema for name, schema in NPU_SCHEMAS.items()},
    **{f"atb::{name}": schema for name, schema in ATB_SCHEMAS.items()},
}

Kernels = dict[str, tuple[Callable, Callable]]
_KERNELS: Kernels = {
    **fia_ops.KERNELS, **kv_cache_ops.KERNELS, **rope_norm.KERNELS, **mla_prolog.KERNELS,
    **scatter_ops.KERNELS, **atb_attention.KERNELS, **formats.KERNELS,
}
_LIBRARIES: dict[str, torch.library.Library] = {}


@functools.cache
def npu_backend() -> str:
    """Return "torch_npu" when torch_npu imports (a real Ascend host), else "emulated"."""
    if importlib.util.find_spec("torch_npu") is None:
        return "emulated"
    try:
        importlib.import_module("torch_npu")
    except Exception:  # torch_npu without CANN fails with ImportError, OSError or RuntimeError
        return "emulated"
    return "torch_npu"


def ensure_npu_ops() -> str:
    """Register the emulated ops once on an emulated host; return the backend name."""
    backend = npu_backend()
    if backend == "emulated" and not _LIBRARIES:
        _register(EMULATED_SCHEMAS, _KERNELS)
    return backend


def _register(schemas: dict[str, str], kernels: Kernels) -> None:
    missing = sorted(set(schemas) ^ set(kernels))
    if missing:
        raise RuntimeError(f"emulated ops without both a schema and a kernel: {missing}")
    libraries = {ns: torch.library.Library(ns, "FRAGMENT") for ns in sorted({q.split("::")[0] for q in schemas})}
    for qualname, schema in schemas.items():
        namespace, name = qualname.split("::")
        library = libraries[namespace]
        kernel, fake = kernels[qualname]
        library.define(schema)
        library.impl(name, kernel, "CompositeExplicitAutograd")
        torch.library.register_fake(qualname, fake, lib=library)
    _LIBRARIES.update(libraries)

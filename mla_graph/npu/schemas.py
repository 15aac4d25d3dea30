"""The schema strings of the torch-npu ops mla_graph emulates, for the running torch's release.

One vendored table per torch-npu release (schema_tables/torch_npu_<release>.py, generated from
that release's wheel by tools/sync_npu_schemas.py); the release is the running torch's stack's
(mla_graph.stacks: 2.10.0.post4 beside torch 2.10, 2.13.0 beside torch 2.13).
"""
from __future__ import annotations

import importlib

from ..stacks import torch_npu_release


def table(release: str) -> tuple[dict[str, str], dict[str, str]]:
    """(npu:: schemas, atb:: schemas) vendored for a torch-npu release."""
    try:
        module = importlib.import_module(f"{__package__}.schema_tables.torch_npu_{release.replace('.', '_')}")
    except ModuleNotFoundError:
        raise LookupError(f"no vendored npu schema table for torch-npu {release}; generate it with "
                          f"tools/sync_npu_schemas.py --wheel <that release's wheel>") from None
    if module.TORCH_NPU_VERSION != release:
        raise LookupError(f"schema table {module.__name__} says torch-npu {module.TORCH_NPU_VERSION}, not {release}")
    return dict(module.NPU_SCHEMAS), dict(module.ATB_SCHEMAS)


TORCH_NPU_VERSION = torch_npu_release()
NPU_SCHEMAS, ATB_SCHEMAS = table(TORCH_NPU_VERSION)

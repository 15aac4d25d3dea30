"""Stand-ins for Ascend's native modules, so vllm-ascend's Python code imports on a CPU host.

Imported first by the subprocesses of tests/test_vllm_ascend.py, never by the test process:
torch_npu, torchair and the other CANN-backed modules become modules whose every attribute is a
MagicMock, `torch.npu` one MagicMock, and what importing torch_npu adds to torch is added. What
the tests check is vllm-ascend's own Python (registration, configuration, weight processing),
which never needs a kernel to run.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from unittest import mock

NATIVE = ("torch_npu", "torchair", "npugraph_ex", "mindie_turbo", "acl", "tbe", "te", "msprobe", "custom_ops",
          "fla_npu", "triton_npu", "vllm_ascend.vllm_ascend_C", "vllm_ascend._cann_ops_custom")


class _Native(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        value = mock.MagicMock(name=f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if any(fullname == root or fullname.startswith(root + ".") for root in NATIVE):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _Native(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module) -> None:
        pass


sys.meta_path.insert(0, _Finder())

import torch  # noqa: E402

if not hasattr(torch, "npu"):
    torch.npu = mock.MagicMock(name="torch.npu")
    sys.modules["torch.npu"] = torch.npu
# what importing torch_npu adds to torch and vllm-ascend imports by name
if not hasattr(torch.distributed, "is_hccl_available"):
    torch.distributed.is_hccl_available = lambda: True

"""torch-npu's own Python meta functions, read without registering anything.

The wheel's op_plugin/meta/_meta_registrations.py registers ~250 functions with
`m = Library("npu", "IMPL", "Meta")` and `@impl(m, "npu_xxx")`. Its source is run in a fresh
module whose imports of torch_npu, torch.library's Library/impl and has_side_effect are answered by
stand-ins: the decorators only record {"npu::npu_xxx": function}, so the dispatcher never sees them
and our emulated ops keep their own fake kernels.

The torch_npu stand-in answers the version probes as an Atlas A3 host (SoC 250, below Ascend950's
260) with CANN 8.5.0: at or after 8.5.0.alpha003, so unused outputs are `[0]` placeholders (the
newer behaviour, which our fake kernels follow), and before 9.2.0 (value=None in sparse flash
attention stays unsupported).
"""
from __future__ import annotations

import builtins
import enum
import pathlib
import re
import types
from typing import Any, Callable

ASSUMED_CANN_VERSION = "8.5.0"
ASSUMED_SOC_VERSION = 250    # c10_npu::SocVersion::Ascend910_9391 (Atlas A3); Ascend950 is 260

# torch_npu's own dtypes are enum values, not torch.dtypes (values from the meta module's
# TORCH_DTYPE_ENUM_VALUE_TO_SCALAR_TYPE_MAP); torch.float8_* are real torch dtypes there.
_NPU_DTYPES = {"int4": 285, "hifloat8": 290, "float8_e5m2": 291, "float8_e4m3fn": 292, "float8_e8m0fnu": 293,
               "float4_e2m1fn_x2": 296, "float4_e1m2fn_x2": 297}

# torch_npu.utils._error_code.ErrCode's members (torch-npu 2.13.0).
ErrCode = enum.Enum("ErrCode", ["SUCCESS", "PARAM", "TYPE", "VALUE", "PTR", "INTERNAL", "MEMORY", "NOT_SUPPORT",
                                "NOT_FOUND", "UNAVAIL", "SYSCALL", "TIMEOUT", "PERMISSION", "ACL", "HCCL", "GE",
                                "EXCEPT"])


def _version_key(version: str) -> tuple:
    """'8.5.0.alpha003' < '8.5.0' < '8.5.0.1' < '8.5.1': a pre-release sorts before its release."""
    key = []
    for part in version.split("."):
        match = re.fullmatch(r"(\d+)|([a-zA-Z]+)(\d*)", part)
        if match is None:
            raise ValueError(f"cannot read CANN version {version!r}; expected parts like 8, 5, 0, alpha003")
        key.append((1, int(match.group(1)), 0) if match.group(1) else (0, 0, int(match.group(3) or 0)))
    return tuple(key) + ((1, -1, 0),)   # the end sorts after pre-release parts, before more numbers


def _torch_npu_stand_in() -> types.SimpleNamespace:
    utils = types.SimpleNamespace(
        get_cann_version=lambda module="CANN": ASSUMED_CANN_VERSION,
        _is_gte_cann_version=lambda version, module="CANN": _version_key(ASSUMED_CANN_VERSION) >= _version_key(version))
    npu = types.SimpleNamespace(utils=utils, _backends=types.SimpleNamespace(get_soc_version=lambda: ASSUMED_SOC_VERSION))
    error_code = types.SimpleNamespace(ErrCode=ErrCode, ops_error=lambda code: f" [torch-npu {code.name} error]")
    return types.SimpleNamespace(npu=npu, utils=types.SimpleNamespace(_error_code=error_code), **_NPU_DTYPES)


class _CapturingLibrary:
    def __init__(self, ns: str, kind: str, dispatch_key: str = "") -> None:
        self.ns, self.kind, self.dispatch_key = ns, kind, dispatch_key


def load_meta_functions(path: pathlib.Path) -> dict[str, Callable]:
    """{'npu::npu_rms_norm': fn, 'npu::npu_apply_adam_w.out': fn, 'aten::...': fn} from `path`."""
    captured: dict[str, Callable] = {}

    def impl(library: _CapturingLibrary, name: str, dispatch_key: str = "") -> Callable[[Callable], Callable]:
        def record(fn: Callable) -> Callable:
            captured[f"{library.ns}::{name}"] = fn
            return fn
        return record

    torch_npu = _torch_npu_stand_in()
    answers: dict[str, Any] = {
        "torch_npu": torch_npu, "torch_npu.utils._error_code": torch_npu.utils._error_code,
        "torch_npu.npu.utils": torch_npu.npu.utils, "torch_npu.npu._backends": torch_npu.npu._backends,
        "torch.library": types.SimpleNamespace(Library=_CapturingLibrary, impl=impl),
        "torch.fx.node": types.SimpleNamespace(has_side_effect=lambda op: op),
    }

    def stand_in_import(name, globals=None, locals=None, fromlist=(), level=0):
        if name in answers and (fromlist or name == "torch_npu"):
            return answers[name]
        if name.split(".")[0] == "torch_npu":
            raise ImportError(f"the wheel's meta module imports {name}, which has no stand-in; "
                              f"expected only {sorted(answers)}")
        return builtins.__import__(name, globals, locals, fromlist, level)

    module = types.ModuleType("torch_npu_wheel_meta_registrations")
    module.__file__ = str(path)
    module.__dict__["__builtins__"] = {**builtins.__dict__, "__import__": stand_in_import}
    exec(compile(path.read_text(), str(path), "exec"), module.__dict__)
    if not any(name.startswith("npu::") for name in captured):
        raise ValueError(f"{path} registered no npu:: meta function; expected @impl(m, 'npu_...') decorators")
    return captured

"""ACL storage formats of emulated tensors, and npu_format_cast, the op that sets them.

On an NPU a tensor's format (ND, FRACTAL_NZ, ...) is a device storage layout that
torch_npu.get_npu_format reports; kernels such as npu_mla_prolog_v3 require FRACTAL_NZ
weights (L9605-L9608). The emulation keeps the data in ND order and only records the format
a tensor was cast to, so a kernel can check it:

    w_nz = torch.ops.npu.npu_format_cast(w, 29)   # same values, a new tensor
    npu_format(w_nz) == 29; npu_format(w) == 2    # ND: never cast

The record follows the tensor object: `w_nz.copy_(new)` keeps it, a view or a clone does not.
"""
from __future__ import annotations

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from mla_graph.npu import limits
from mla_graph.npu._checks import reject, reject_given

OP = "npu_format_cast"
# torchair's Format enum (torch_npu/dynamo/torchair/ge/_ge_graph.py:59-78): every code an ACL
# tensor format has. The emulation models two of them.
ACL_FORMATS = {0: "NCHW", 1: "NHWC", 2: "ND", 3: "NC1HWC0", 4: "FRACTAL_Z", 12: "NC1HWC0_C04", 16: "HWCN",
               27: "NDHWC", 29: "FRACTAL_NZ", 30: "NCDHW", 32: "NDC1HWC0", 33: "FRACTAL_Z_3D", 35: "NC",
               47: "NCL", 50: "FRACTAL_NZ_C0_16", 52: "FRACTAL_NZ_C0_2", 53: "FRACTAL_NZ_C0_4",
               54: "FRACTAL_NZ_C0_8"}
EMULATED = (limits.ACL_FORMAT_ND, limits.ACL_FORMAT_FRACTAL_NZ)

_FORMATS: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


def npu_format(tensor: torch.Tensor) -> int:
    """The ACL format npu_format_cast gave this tensor; ND for one never cast."""
    return _FORMATS.get(tensor, limits.ACL_FORMAT_ND)


def _check(acl_format: int, customize_dtype: int | None, input_dtype: int | None) -> None:
    reject_given(OP, customize_dtype=customize_dtype, input_dtype=input_dtype)
    if acl_format not in ACL_FORMATS:
        limits.enforce([limits.Violation(
            OP, "acl_format", acl_format, f"an ACL format code, one of {tuple(ACL_FORMATS)}",
            "acl_format, L1283; the codes are torchair's Format enum, ge/_ge_graph.py:59-78")])
    if acl_format not in EMULATED:
        reject(OP, "acl_format", acl_format, f"2 (ND) or 29 (FRACTAL_NZ); {ACL_FORMATS[acl_format]} "
               "is a real format the emulation does not model")


def npu_format_cast(self: torch.Tensor, acl_format: int, *, customize_dtype: int | None = None,
                    input_dtype: int | None = None) -> torch.Tensor:
    _check(acl_format, customize_dtype, input_dtype)
    out = self.clone(memory_format=torch.contiguous_format)
    _FORMATS[out] = acl_format
    return out


def npu_format_cast_fake(self: torch.Tensor, acl_format: int, *, customize_dtype: int | None = None,
                         input_dtype: int | None = None) -> torch.Tensor:
    _check(acl_format, customize_dtype, input_dtype)
    return self.new_empty(self.shape)   # META: _npu_format_cast keeps shape and dtype


KERNELS = {f"npu::{OP}": (npu_format_cast, npu_format_cast_fake)}

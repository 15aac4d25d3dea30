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

from mla_graph.op_kinds import mark_no_kernel

from .registry import npu_backend

AIR_SCHEMAS: dict[str, str] = {   # as torchair 2.13.0 defines them
    "scope_enter": "scope_enter(str[] keys, str[] values, bool need_execute=False) -> None",
    "scope_exit": "scope_exit(bool need_execute=False) -> None",
    "wait_tensor": "wait_tensor(Tensor self, Tensor dependency) -> Tensor",
    # torchair.ops.npu_fused_infer_attention_score: FIA with the lengths as device tensors (GE only;
    # torchair/ops/_npu_fused_infer_attention_score.py)
    "npu_fused_infer_attention_score": (
        "npu_fused_infer_attention_score(Tensor query, Tensor key, Tensor value, *, Tensor? pse_shift=None, "
        "Tensor? atten_mask=None, Tensor? actual_seq_lengths=None, Tensor? actual_seq_lengths_kv=None, "
        "Tensor? dequant_scale1=None, Tensor? quant_scale1=None, Tensor? dequant_scale2=None, Tensor? quant_scale2=None, "
        "Tensor? quant_offset2=None, Tensor? antiquant_scale=None, Tensor? antiquant_offset=None, "
        "Tensor? key_antiquant_scale=None, Tensor? key_antiquant_offset=None, Tensor? value_antiquant_scale=None, "
        "Tensor? value_antiquant_offset=None, Tensor? block_table=None, Tensor? query_padding_size=None, "
        "Tensor? kv_padding_size=None, Tensor? key_shared_prefix=None, Tensor? value_shared_prefix=None, "
        "Tensor? actual_shared_prefix_len=None, Tensor? query_rope=None, Tensor? key_rope=None, "
        "Tensor? key_rope_antiquant_scale=None, int num_heads=1, float scale=1.0, int pre_tokens=2147483647, "
        "int next_tokens=2147483647, str input_layout=\"BSH\", int num_key_value_heads=0, int sparse_mode=0, "
        "int inner_precise=0, int block_size=0, int antiquant_mode=0, int key_antiquant_mode=0, "
        "int value_antiquant_mode=0, bool softmax_lse_flag=False) -> (Tensor, Tensor)"),
}
# torchair modules whose import defines the ops above (torch-npu 2.13.0)
AIR_MODULES = ("torchair.scope", "torchair.scope._wait_tensor", "torchair.ops._npu_fused_infer_attention_score")
_LIBRARY: list[torch.library.Library] = []


def _scope_enter(keys: list[str], values: list[str], need_execute: bool = False) -> None:
    if len(keys) != len(values):
        raise ValueError(f"air.scope_enter: {len(keys)} keys but {len(values)} values; expected one value per key")


def _scope_exit(need_execute: bool = False) -> None:
    return None


def _wait_tensor(self: torch.Tensor, dependency: torch.Tensor) -> torch.Tensor:
    return self.clone()   # the schema returns a new tensor, not an alias of `self`


_LENGTHS = ("actual_seq_lengths", "actual_seq_lengths_kv", "actual_shared_prefix_len")


def _air_fia(query, key, value, **kwargs):
    """The npu:: kernel with the length tensors read back as lists (what GE does on the device)."""
    lists = {k: kwargs[k].tolist() if kwargs.get(k) is not None else None for k in _LENGTHS}
    return torch.ops.npu.npu_fused_infer_attention_score(query, key, value, **{**kwargs, **lists})


def _air_fia_fake(query, key, value, **kwargs):
    # Shapes never depend on the lengths' values: stand-in one-element lists keep the npu:: meta's
    # "lengths given" checks without reading data.
    lists = {k: [1] if kwargs.get(k) is not None else None for k in _LENGTHS}
    return torch.ops.npu.npu_fused_infer_attention_score(query, key, value, **{**kwargs, **lists})


def _wait_tensor_fake(self: torch.Tensor, dependency: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(self)


# the markers are control edges (GE attributes and an Identity), not device kernels
mark_no_kernel("air.scope_enter.default", "air.scope_exit.default", "air.wait_tensor.default")


def ensure_air_ops() -> str:
    """Make torch.ops.air.scope_enter / scope_exit / wait_tensor exist; return who defines them:
    "torchair" (real torchair, on a torch_npu host, or already registered by someone else in this
    process) or "emulated" (registered here)."""
    if all(hasattr(torch.ops.air, name) for name in AIR_SCHEMAS):
        return "emulated" if _LIBRARY else "torchair"
    if npu_backend() == "torch_npu":
        # torch_npu installs torchair as a lazy top-level module; scope defines the markers on import,
        # _wait_tensor is otherwise loaded only on the first npu_wait_tensor call, and torchair.ops
        # imports the module that defines air::npu_fused_infer_attention_score only inside the
        # first call of torchair.ops.npu_fused_infer_attention_score(): import each one directly.
        for module in AIR_MODULES:
            importlib.import_module(module)
        return "torchair"
    existing = [name for name in AIR_SCHEMAS if hasattr(torch.ops.air, name)]
    if existing:
        raise RuntimeError(f"torch.ops.air defines {existing} but not all of {list(AIR_SCHEMAS)}; "
                           "something registered part of torchair's air:: ops")
    library = torch.library.Library("air", "FRAGMENT")
    kernels = {"scope_enter": (_scope_enter, None), "scope_exit": (_scope_exit, None),
               "wait_tensor": (_wait_tensor, _wait_tensor_fake),
               "npu_fused_infer_attention_score": (_air_fia, _air_fia_fake)}
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

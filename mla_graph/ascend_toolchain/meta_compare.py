"""Judge our fake kernels with torch-npu's own meta functions.

For every npu:: (and air::) node, the wheel's meta function runs on the node's fake arguments
(node.meta["val"] of its inputs, under the graph's fake mode) and its outputs are compared with
the node's own node.meta["val"]: shapes, dtypes, and strides of dimensions longer than 1 (a
stride of a size-0 or size-1 dimension never addresses memory).
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Any, Callable

import torch
from torch._guards import detect_fake_mode
from torch.fx import GraphModule, Node

from .findings import GeFinding
from .toolchain import Toolchain, load

# Namespaces whose ops torch-npu should know; a missing meta function there is worth a note.
_TORCH_NPU_NAMESPACES = ("npu", "atb")
_TORCHAIR_META = {  # torchair's own meta functions for its air:: ops: {key: (module, function)}
    "air::npu_fused_infer_attention_score": ("torchair.ops._npu_fused_infer_attention_score",
                                             "npu_fused_infer_attention_score_meta_impl"),
}


def _key(op: torch._ops.OpOverload | str) -> str:
    if isinstance(op, torch._ops.OpOverload):
        name = op._schema.name
        return name if op._overloadname == "default" else f"{name}.{op._overloadname}"
    name = op if "::" in op else f"npu::{op}"
    return name.removesuffix(".default")


def wheel_meta(op: torch._ops.OpOverload | str, toolchain: Toolchain | None = None) -> Callable | None:
    """The wheel's meta function for `op` ('npu_rms_norm', 'npu::npu_apply_adam_w.out', an
    OpOverload; air:: ops get torchair's), or None."""
    toolchain = toolchain or load()
    key = _key(op)
    if key in _TORCHAIR_META:
        module, name = _TORCHAIR_META[key]
        return getattr(importlib.import_module(module), name, None)
    return toolchain.meta_functions().get(key)


def compare_with_wheel_meta(gm: GraphModule, toolchain: Toolchain | None = None) -> list[GeFinding]:
    """meta-mismatch / meta-error findings for npu::, atb:: and air:: nodes, and a meta-missing
    note for npu:: and atb:: ops the wheel has no meta function for."""
    toolchain = toolchain or load()
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"
             and isinstance(n.target, torch._ops.OpOverload) and n.target.namespace in (*_TORCH_NPU_NAMESPACES, "air")]
    fake_mode = detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes])
    findings = []
    for node in nodes:
        target, expected = node.target, node.meta.get("val")
        meta = wheel_meta(target, toolchain)
        if meta is None:
            if target.namespace in _TORCH_NPU_NAMESPACES:
                findings.append(GeFinding("note", "meta-missing", node.name, str(target),
                                          f"torch-npu 2.13.0 has no Python meta function for {_key(target)}",
                                          "nothing to compare; its fake kernel stands unchecked"))
            continue
        if expected is None:
            continue
        args, kwargs = _dispatcher_args(target, node, fake_mode is None)
        try:
            with fake_mode or contextlib.nullcontext():
                got = meta(*args, **kwargs)
        except Exception as error:  # the meta function's own argument checks raise RuntimeError, ValueError, ...
            findings.append(GeFinding("error", "meta-error", node.name, str(target),
                                      f"the wheel's meta function rejected the arguments: {type(error).__name__}: "
                                      f"{(str(error).strip().splitlines() or [''])[0][:300]}",
                                      "change the arguments to what torch-npu accepts, or explain why it is wrong"))
            continue
        problems = _differences(got, expected)
        if problems:
            findings.append(GeFinding("error", "meta-mismatch", node.name, str(target), "; ".join(problems),
                                      "make the fake kernel (or the pass that set node.meta['val']) match torch-npu"))
    return findings


def _dispatcher_args(op: torch._ops.OpOverload, node: Node, to_meta: bool) -> tuple[list, dict]:
    """The node's arguments as the dispatcher hands them to a kernel: positional ones in order,
    keyword-only ones by name, defaults filled in; FX nodes replaced by their fake values."""
    def value(x: Any) -> Any:
        if isinstance(x, Node):
            x = x.meta.get("val")
            if to_meta and isinstance(x, torch.Tensor):
                return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
        return x

    args, kwargs = [], {}
    for i, arg in enumerate(op._schema.arguments):
        if i < len(node.args):
            given = node.args[i]
        elif arg.name in node.kwargs:
            given = node.kwargs[arg.name]
        elif arg.has_default_value():
            given = arg.default_value
        else:
            raise ValueError(f"node {node.name} calls {op} without its required argument {arg.name!r}")
        given = torch.fx.node.map_aggregate(given, value)
        if arg.kwarg_only:
            kwargs[arg.name] = given
        else:
            args.append(given)
    return args, kwargs


def _flat(value: Any) -> list:
    return list(value) if isinstance(value, (tuple, list)) else [value]


def _differences(got: Any, expected: Any) -> list[str]:
    got, expected = _flat(got), _flat(expected)
    if len(got) != len(expected):
        return [f"the wheel's meta returns {len(got)} outputs, node.meta['val'] has {len(expected)}"]
    problems = []
    for i, (g, e) in enumerate(zip(got, expected)):
        if not isinstance(g, torch.Tensor) or not isinstance(e, torch.Tensor):
            if isinstance(g, torch.Tensor) != isinstance(e, torch.Tensor):
                problems.append(f"output {i}: the wheel's meta gives {type(g).__name__}, "
                                f"node.meta['val'] {type(e).__name__}")
            continue
        if _sizes(g.shape) != _sizes(e.shape):
            problems.append(f"output {i}: shape {_sizes(e.shape)} in node.meta['val'], the wheel's meta gives "
                            f"{_sizes(g.shape)}")
        elif g.dtype != e.dtype:
            problems.append(f"output {i}: dtype {e.dtype} in node.meta['val'], the wheel's meta gives {g.dtype}")
        elif e.numel() != 0:
            long_dims = [d for d, size in enumerate(_sizes(e.shape)) if size != "1"]
            if [str(g.stride(d)) for d in long_dims] != [str(e.stride(d)) for d in long_dims]:
                problems.append(f"output {i}: strides {_sizes(e.stride())} in node.meta['val'], the wheel's meta "
                                f"gives {_sizes(g.stride())}")
    return problems


def _sizes(sizes) -> list[str]:
    """Sizes as text, so symbolic ones compare without adding guards."""
    return [str(s) for s in sizes]

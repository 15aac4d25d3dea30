"""The torch releases mla-graph runs on differ here, and only here.

mla-graph pins torch 2.13.0 and also runs on torch 2.10 (the stack vllm-ascend serves). Each
difference between them is handled once, in this module, by what the running torch does (a probe),
never by its version string; the rest of the code calls these helpers.

- `fake_mode_context(mode)`: run ops on fake tensors with symbolic sizes outside make_fx. On torch
  2.10, ATen's C++ matmul (reached from aten.linear / aten.matmul with a >2-D input) folds the batch
  dims after `numel()`, which a tensor with symbolic sizes refuses ("Cannot call numel() on tensor with
  symbolic sizes/strides"); pytorch/pytorch#183397 made that path symbolic (sym_numel) in later
  releases. make_fx(tracing_mode="symbolic") enables the Python dispatcher, which routes such
  CompositeImplicitAutograd ops to their symbolic-aware Python decompositions, so capture works on
  either release; a fake run after capture (a pass building a node, the verifier re-running one) must
  do the same where the running torch needs it.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator

import torch

__all__ = ["fake_mode_context", "composite_ops_need_python_dispatcher"]


@functools.cache
def composite_ops_need_python_dispatcher() -> bool:
    """Whether this torch's C++ composite kernels fail on symbolic sizes where make_fx's Python
    dispatcher would succeed (torch 2.10: aten.linear on a [s0, s1, D] fake tensor)."""
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    shape_env = ShapeEnv(duck_shape=False)
    source = ConstantSource("mla_graph_probe")
    sym = shape_env.create_symbol(3, source=source, dynamic_dim=DimDynamic.DYNAMIC)
    size = shape_env.create_symintnode(sym, hint=3, source=source)
    with FakeTensorMode(shape_env=shape_env):
        x, w = torch.empty(size, 2, 4), torch.empty(5, 4)
        try:
            torch.ops.aten.linear.default(x, w)
        except RuntimeError:
            return True
    return False


@contextlib.contextmanager
def fake_mode_context(mode: Any) -> Iterator[Any]:
    """`with mode:` for running ops on `mode`'s fake tensors as make_fx's symbolic tracing runs them
    (with the Python dispatcher where this torch's C++ composite kernels need it)."""
    if mode.shape_env is not None and composite_ops_need_python_dispatcher():
        from torch._dispatch.python import enable_python_dispatcher

        with enable_python_dispatcher(), mode:
            yield mode
    else:
        with mode:
            yield mode

"""check_pass: the harness for writing a pass test (ours and yours).

    def build(x, w):                       # plain PyTorch, traced with fake tensors
        return torch.ops.aten.view(x @ w, [4, 8])

    check_pass(remove_noop_views, build, (torch.randn(4, 6), torch.randn(6, 8)),
               expect_absent=["aten.view.default"], expect_matches=1)

It traces `build` to an FX graph with fake values, runs the pass through a PassManager (so the
verifier and the pass's requires/ensures apply), then checks structure with FileCheck on
`gm.code`, the match count, and numerics against the graph before the pass.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch.fx import GraphModule
from torch.fx.experimental.proxy_tensor import make_fx
from torch.testing import FileCheck

from .base import GraphPass, PassResult
from .manager import PassManager, PassRecord

# (rtol, atol) per dtype: what the same math in two op orders can differ by.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


@dataclass
class PassCheck:
    record: PassRecord
    before: GraphModule
    after: GraphModule


def trace(build: Callable, inputs: Sequence[torch.Tensor]) -> GraphModule:
    """An FX graph of `build` over aten ops, every node with its fake value."""
    with torch.no_grad():
        return make_fx(build, tracing_mode="fake", pre_dispatch=True)(*inputs)


def check_pass(pass_fn: GraphPass, build: Callable | GraphModule, inputs: Sequence[torch.Tensor], *,
               expect_ops: Mapping[str, int] | None = None, expect_absent: Sequence[str] = (),
               expect_matches: int | None = None, expect_changed: bool | None = None,
               compare_numerics: bool = True, tolerances: Mapping[torch.dtype, tuple[float, float]] | None = None,
               ) -> PassCheck:
    """Run `pass_fn` on the traced `build` and check it. Returns the record and both graphs.

    expect_ops: {"aten.linear.default": 2} exact counts after the pass.
    expect_absent: op names that must not appear after the pass.
    expect_matches / expect_changed: the pass's own report.
    """
    gm = build if isinstance(build, GraphModule) else trace(build, inputs)
    before = copy.deepcopy(gm)
    record = PassManager([pass_fn]).run(gm).records[0]
    code = gm.code
    for op, count in (expect_ops or {}).items():
        FileCheck().check_count(f"torch.ops.{op}(", count, exactly=True).run(code)
    for op in expect_absent:
        FileCheck().check_not(f"torch.ops.{op}(").run(code)
    if expect_matches is not None and record.matches != expect_matches:
        raise AssertionError(f"{record.name}: expected {expect_matches} matches, got {record.matches} "
                             f"({record.matches_by_rule})")
    if expect_changed is not None and record.changed != expect_changed:
        raise AssertionError(f"{record.name}: expected changed={expect_changed}, got {record.changed}")
    if compare_numerics:
        tol = dict(TOLERANCES, **(tolerances or {}))
        expected = before(*[_clone(x) for x in inputs])
        actual = gm(*[_clone(x) for x in inputs])
        for e, a in zip(_flat(expected), _flat(actual)):
            rtol, atol = tol.get(e.dtype, (0.0, 0.0))
            torch.testing.assert_close(a, e, rtol=rtol, atol=atol,
                                       msg=lambda m: f"{record.name} changed the numerics: {m}")
    return PassCheck(record, before, gm)


def _clone(x):
    return x.clone() if isinstance(x, torch.Tensor) else x


def _flat(value) -> list[torch.Tensor]:
    flat, _ = torch.utils._pytree.tree_flatten(value)
    return [x for x in flat if isinstance(x, torch.Tensor)]


__all__ = ["PassCheck", "PassResult", "TOLERANCES", "check_pass", "trace"]

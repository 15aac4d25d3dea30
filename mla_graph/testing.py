"""check_pass: the harness for writing a pass test (ours and yours).

A small graph, traced from plain PyTorch with fake tensors:

    from mla_graph.passes import remove_noop_views

    def build(x, w):
        return torch.ops.aten.view.default(x @ w, [4, 8])    # already [4, 8]: a no-op view

    check_pass(remove_noop_views, build, (torch.randn(4, 6), torch.randn(6, 8)),
               expect_absent=["aten.view.default"], expect_matches=1)

A captured MLA graph (fresh inputs per graph through `make_inputs`, the paged caches compared with
`compare_mutated=True`) is worked through in docs/writing-a-pass.md.

It traces `build` (or takes the GraphModule, rewritten in place), runs the pass through a
PassManager (so the verifier and the pass's requires/ensures apply), then checks structure with
FileCheck on `gm.code`, the match count, the graph expected after the pass (by structure, as
TVM's assert_structural_equal: `expect_graph`), and numerics against the graph before the pass.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch.fx import GraphModule
from torch.fx.experimental.proxy_tensor import make_fx
from torch.testing import FileCheck

from mla_graph.passes.base import GraphPass, PassResult
from mla_graph.contract import GraphMeta
from mla_graph.passes.manager import PassManager, PassRecord

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
    # placeholder names whose tensors a run changed and that were compared (compare_mutated)
    mutated: list[str] = field(default_factory=list)


def trace(build: Callable, inputs: Sequence[torch.Tensor]) -> GraphModule:
    """An FX graph of `build` over aten ops, every node with its fake value."""
    with torch.no_grad():
        return make_fx(build, tracing_mode="fake", pre_dispatch=True)(*inputs)


def snapshot(gm: GraphModule) -> GraphModule:
    """An independent copy of `gm`'s graph that shares its weights (a deep copy would duplicate
    them); `meta` containers are copied one level so a pass editing gm.meta (e.g. adding a graph
    input to its GraphMeta) leaves the copy's alone."""
    copied = GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    copied.meta = {k: v.copy() if isinstance(v, (list, dict, set, GraphMeta)) else v for k, v in gm.meta.items()}
    return copied


def check_pass(pass_fn: GraphPass, build: Callable | GraphModule, inputs: Sequence[object] | None = None, *,
               expect_ops: Mapping[str, int] | None = None, expect_absent: Sequence[str] = (),
               expect_matches: int | None = None, expect_changed: bool | None = None,
               compare_numerics: bool = True, tolerances: Mapping[torch.dtype, tuple[float, float]] | None = None,
               make_inputs: Callable[[GraphModule], Sequence[object]] | None = None,
               compare_mutated: bool = False,
               expect_graph: Callable | GraphModule | torch.fx.Graph | None = None) -> PassCheck:
    """Run `pass_fn` on the traced `build` and check it. Returns the record and both graphs.

    expect_ops: {"aten.linear.default": 2} exact counts after the pass (0: absent).
    expect_absent: op names that must not appear after the pass.
    expect_matches / expect_changed: the pass's own report. A pass that reports changed=False
    must also leave gm.code as it was.
    make_inputs(graph): fresh inputs for that graph's placeholders, called once for the graph
    before the pass and once for the graph after (a pass may add inputs); otherwise both run on
    clones of `inputs`.
    compare_mutated: also compare, by placeholder name, the input tensors either run changed
    (in-place writes such as cache updates), with the same tolerances as the outputs.
    expect_graph: the graph the pass must leave (Before/Expected), compared by structure
    (assert_structural_equal); a function is traced over `inputs` as `build` is.
    """
    if isinstance(build, GraphModule):
        gm = build
    elif inputs is None:
        raise ValueError(f"check_pass: tracing {getattr(build, '__name__', build)!r} needs example `inputs`; "
                         "got None (pass inputs, or a GraphModule as `build`)")
    else:
        gm = trace(build, inputs)
    if compare_numerics and inputs is None and make_inputs is None:
        raise ValueError("check_pass: comparing numerics needs `inputs` or `make_inputs`; got neither "
                         "(or pass compare_numerics=False)")
    before = snapshot(gm)
    record = PassManager([pass_fn]).run(gm).records[0]
    code = gm.code
    for op, count in (expect_ops or {}).items():
        if count == 0:
            FileCheck().check_not(f"torch.ops.{op}(").run(code)
        else:
            FileCheck().check_count(f"torch.ops.{op}(", count, exactly=True).run(code)
    for op in expect_absent:
        FileCheck().check_not(f"torch.ops.{op}(").run(code)
    if expect_matches is not None and record.matches != expect_matches:
        raise AssertionError(f"{record.name}: expected {expect_matches} matches, got {record.matches} "
                             f"({record.matches_by_rule})")
    if expect_changed is not None and record.changed != expect_changed:
        raise AssertionError(f"{record.name}: expected changed={expect_changed}, got {record.changed}")
    if not record.changed and code != before.code:
        raise AssertionError(f"{record.name} reported changed=False but rewrote the graph")
    if expect_graph is not None:
        if callable(expect_graph) and not isinstance(expect_graph, GraphModule):
            if inputs is None:
                raise ValueError("check_pass: tracing expect_graph needs example `inputs`")
            expect_graph = trace(expect_graph, inputs)
        assert_structural_equal(gm, expect_graph)
    check = PassCheck(record, before, gm)
    if compare_numerics:
        tol = {**TOLERANCES, **(tolerances or {})}
        expected, expected_in, changed_before = _run(before, make_inputs, inputs)
        actual, actual_in, changed_after = _run(gm, make_inputs, inputs)
        pairs = list(zip(_flat(expected), _flat(actual)))
        if len(_flat(expected)) != len(_flat(actual)):
            raise AssertionError(f"{record.name} changed the number of output tensors: "
                                 f"{len(_flat(expected))} -> {len(_flat(actual))}")
        if compare_mutated:
            check.mutated = [name for name in expected_in if name in actual_in
                             and (name in changed_before or name in changed_after)]
            pairs += [(expected_in[name], actual_in[name]) for name in check.mutated]
        for e, a in pairs:
            rtol, atol = tol.get(e.dtype, (0.0, 0.0))
            torch.testing.assert_close(a, e, rtol=rtol, atol=atol,
                                       msg=lambda m: f"{record.name} changed the numerics: {m}")
    return check


def _run(gm: GraphModule, make_inputs: Callable[[GraphModule], Sequence[object]] | None,
         inputs: Sequence[object] | None) -> tuple[object, dict[str, torch.Tensor], set[str]]:
    """gm's output, its tensor inputs by placeholder name after the run, and the names it changed."""
    args = list(make_inputs(gm)) if make_inputs is not None else [_clone(x) for x in inputs]
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    if len(args) != len(names):
        raise ValueError(f"check_pass: the graph takes {len(names)} inputs {names}, got {len(args)}")
    tensors = {name: x for name, x in zip(names, args) if isinstance(x, torch.Tensor)}
    # compared by value, not by version counter: a write of the same values is no change
    pristine = {name: x.clone() for name, x in tensors.items()}
    with torch.no_grad():
        out = gm(*args)
    changed = {name for name, x in tensors.items() if not torch.equal(x, pristine[name])}
    return out, tensors, changed


def _clone(x):
    return x.clone() if isinstance(x, torch.Tensor) else x


def _flat(value) -> list[torch.Tensor]:
    flat, _ = torch.utils._pytree.tree_flatten(value)
    return [x for x in flat if isinstance(x, torch.Tensor)]


def structural_diff(actual: GraphModule | torch.fx.Graph, expected: GraphModule | torch.fx.Graph) -> str | None:
    """None when two graphs are the same computation written the same way, else where they first
    differ (as TVM's assert_structural_equal): the same calls in the same order, each on the
    corresponding arguments (inputs by position, weights and constants by attribute name, literals
    equal), the same outputs. Node names, fake values and metadata are not compared."""
    graphs = [g.graph if isinstance(g, GraphModule) else g for g in (actual, expected)]
    a_nodes, e_nodes = ([n for n in g.nodes] for g in graphs)
    env: dict[torch.fx.Node, torch.fx.Node] = {}

    def same(x, y) -> bool:
        if isinstance(x, torch.fx.Node) or isinstance(y, torch.fx.Node):
            return isinstance(x, torch.fx.Node) and isinstance(y, torch.fx.Node) and env.get(x) is y
        if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
            return len(x) == len(y) and all(same(i, j) for i, j in zip(x, y))
        if isinstance(x, dict) and isinstance(y, dict):
            return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        return type(x) is type(y) and x == y

    for i, (a, e) in enumerate(zip(a_nodes, e_nodes)):
        where = f"node {i} ({a.format_node()} vs expected {e.format_node()})"
        if a.op != e.op:
            return f"{where}: {a.op} where {e.op} was expected"
        if a.op in ("call_function", "call_method", "get_attr", "call_module") and a.target != e.target:
            return f"{where}: target {a.target} where {e.target} was expected"
        if not same(a.args, e.args) or not same(a.kwargs, e.kwargs):
            return f"{where}: different arguments"
        env[a] = e
    if len(a_nodes) != len(e_nodes):
        extra = a_nodes[len(e_nodes):] or e_nodes[len(a_nodes):]
        which = "the graph has" if len(a_nodes) > len(e_nodes) else "the expected graph has"
        return f"{which} {len(extra)} more node(s), from {extra[0].format_node()}"
    return None


def assert_structural_equal(actual: GraphModule | torch.fx.Graph, expected: GraphModule | torch.fx.Graph) -> None:
    """Raise AssertionError (with both graphs) where structural_diff finds a difference."""
    diff = structural_diff(actual, expected)
    if diff is not None:
        graphs = [g.graph if isinstance(g, GraphModule) else g for g in (actual, expected)]
        raise AssertionError(f"graphs differ: {diff}\n--- graph:\n{graphs[0]}\n--- expected:\n{graphs[1]}")


__all__ = ["PassCheck", "PassResult", "TOLERANCES", "assert_structural_equal", "check_pass", "snapshot",
           "structural_diff", "trace"]

"""The rewrite layer (passes.rewrite): traced patterns, rules and the driver, on small hand-built graphs."""
import inspect
import operator

import pytest
import torch
from pass_graphs import GraphBuilder, nodes, ops

from mla_graph.passes.graph_utils import call
from mla_graph.passes.rewrite import Pattern, Rule, Skip, rewrite

aten = torch.ops.aten


@Pattern
def SCALED_SUM(x, y, s):
    return aten.mul.Tensor(aten.add.Tensor(x, y), s)


@Pattern
def SQUARE_PLUS(x, y):
    return aten.add.Tensor(aten.mul.Tensor(x, x), y)


@Pattern
def NEG_OF_FIRST(x, sizes):
    return aten.neg.default(aten.split_with_sizes.default(x, sizes, -1)[0])


def _graph(build):
    b = GraphBuilder()
    a, c = b.input("a", (4, 6)), b.input("c", (4, 6))
    return b.finish(build(b, a, c)), a, c


def test_arguments_match_nodes_and_literals():
    gm, a, c = _graph(lambda b, a, c: b.op(aten.mul.Tensor, b.op(aten.add.Tensor, a, c), 3.0))
    (mul,) = nodes(gm, aten.mul.Tensor)
    m = SCALED_SUM.match(mul)
    assert (m.x, m.y, m.s, m.node) == (a, c, 3.0, mul)
    assert set(m.nodes) == {mul, *nodes(gm, aten.add.Tensor)}


def test_an_argument_used_twice_is_one_node():
    same, a, _ = _graph(lambda b, a, c: b.op(aten.add.Tensor, b.op(aten.mul.Tensor, a, a), c))
    assert SQUARE_PLUS.match(nodes(same, aten.add.Tensor)[0]).x is a
    different, _, _ = _graph(lambda b, a, c: b.op(aten.add.Tensor, b.op(aten.mul.Tensor, a, c), c))
    assert SQUARE_PLUS.match(nodes(different, aten.add.Tensor)[0]) is None


@pytest.mark.parametrize("index, matches", [(0, True), (1, False)])
def test_literals_written_in_the_pattern_must_be_equal(index, matches):
    """A getitem index is structure: the second half of a split is not the first."""
    def build(b, a, c):
        parts = b.op(aten.split_with_sizes.default, a, [2, 4], -1)
        return b.op(aten.neg.default, b.op(operator.getitem, parts, index))
    gm, a, _ = _graph(build)
    m = NEG_OF_FIRST.match(nodes(gm, aten.neg.default)[0])
    assert (m is not None) == matches
    if matches:
        assert m.sizes == [2, 4] and m.x is a


def test_the_driver_counts_notes_and_records_where_a_rule_was_written():
    gm, a, c = _graph(lambda b, a, c: b.op(aten.mul.Tensor, b.op(aten.add.Tensor, a, c), 3.0))
    (mul,) = nodes(gm, aten.mul.Tensor)
    skip = Rule("never", SCALED_SUM, emit=lambda g, m: None, check=lambda m: Skip(f"{m.node.name}: not today"))
    line = inspect.currentframe().f_lineno + 1
    spread = Rule("(x + y) * s -> x * s + y * s", SCALED_SUM, emit=lambda g, m: call(
        g, aten.add.Tensor, call(g, aten.mul.Tensor, m.x, m.s), call(g, aten.mul.Tensor, m.y, m.s)))
    (add,) = nodes(gm, aten.add.Tensor)
    result = rewrite(gm, [skip, spread])
    assert result.notes == [f"{mul.name}: not today"]
    assert result.matches_by_rule == {"(x + y) * s -> x * s + y * s": 1}
    assert result.rule_sources["(x + y) * s -> x * s + y * s"] == f"tests/test_rewrite.py:{line}"
    # the anchor went, and so did the pattern's add that nothing reads any more
    assert ops(gm) == ["aten.mul.Tensor", "aten.mul.Tensor", "aten.add.Tensor"] and add not in gm.graph.nodes


def test_a_pattern_rule_notes_what_it_missed():
    gm, _, _ = _graph(lambda b, a, c: b.op(aten.mul.Tensor, a, c))
    (mul,) = nodes(gm, aten.mul.Tensor)
    rule = Rule("mul(add)", SCALED_SUM, emit=lambda g, m: None, missed="no add in front")
    result = rewrite(gm, [rule])
    assert not result.changed and result.notes == [f"{mul.name}: no add in front"]


@Pattern
def RELU_TWICE(x):
    r = aten.relu.default(x)
    return aten.neg.default(r), aten.sigmoid.default(r)      # anchors: neg, then sigmoid after it


def test_the_driver_skips_a_node_an_earlier_match_erased():
    """A two-anchor match erases its second anchor (as the prolog erases its cache write); a later
    rule on that op must not count or rewrite the erased node."""
    def build(b, a, c):
        r = b.op(aten.relu.default, a)
        return b.op(aten.neg.default, r), b.op(aten.sigmoid.default, r)
    gm, _, _ = _graph(build)

    def fuse(g, m):
        (sig,) = [n for n in m.nodes if n.target is aten.sigmoid.default]
        out = call(g, aten.tanh.default, m.x)
        sig.replace_all_uses_with(out)
        g.erase_node(sig)
        return out
    result = rewrite(gm, [Rule("fuse", RELU_TWICE, emit=fuse),
                          Rule("sigmoid -> exp", aten.sigmoid.default, emit=lambda g, n: call(g, aten.exp.default, *n.args))])
    assert result.matches_by_rule == {"fuse": 1}
    gm.graph.lint()


@Pattern
def NEG_OF(input):                         # fx renames a placeholder called input; the match does not
    return aten.neg.default(input)


def test_match_values_are_named_as_the_pattern_function_names_its_arguments():
    gm, a, _ = _graph(lambda b, a, c: b.op(aten.neg.default, a))
    assert NEG_OF.match(nodes(gm, aten.neg.default)[0]).input is a
    with pytest.raises(ValueError, match="may not be named"):
        Pattern(lambda node: aten.neg.default(node))


# ---- replacements written as torch code, the matcher's guards, provenance -----------------------

def test_a_traced_replacement_is_the_graph_its_torch_code_makes():
    """traced(fn): fn is ordinary torch code, traced at the match over the graph's fake values (the
    sizes stay the graph's symbols); its nodes carry fake values and say where they came from."""
    from mla_graph.passes.rewrite import traced
    from mla_graph.testing import assert_structural_equal

    def build(b):
        T = b.sym("T", 5)
        x, w = b.input("x", (T, 6)), b.input("w", (3, 6))
        return b.finish(b.op(aten.linear.default, x, w))
    gm = build(GraphBuilder())
    (linear,) = nodes(gm, aten.linear.default)
    result = rewrite(gm, [Rule("linear -> mm", aten.linear.default, emit=traced(lambda x, w: torch.mm(x, w.t())))])
    assert result.matches_by_rule == {"linear -> mm": 1}
    # the expected graph, built by hand
    b = GraphBuilder()
    T = b.sym("T", 5)
    x, w = b.input("x", (T, 6)), b.input("w", (3, 6))
    expected = b.finish(b.op(aten.mm.default, x, b.op(aten.t.default, w)))
    assert_structural_equal(gm, expected)
    (mm,) = nodes(gm, aten.mm.default)
    assert mm.meta["val"].shape[1] == 3
    assert mm.meta["val"].shape[0].node.expr == linear.meta["val"].shape[0].node.expr   # the graph's own symbol
    for node in (mm, *nodes(gm, aten.t.default)):
        [source] = node.meta["from_node"]     # torch.fx's provenance: the node replaced, the rule
        assert (source.name, source.pass_name) == ("linear_default", "linear -> mm")


def test_a_traced_replacement_keeps_two_inputs_with_one_fake_value_apart():
    """Two inputs may hold one fake value object (rope cos and sin are made alike): each still traces
    as itself (make_fx knows an input by its object; the second once stood for both)."""
    from mla_graph.passes.rewrite import emit_traced

    b = GraphBuilder()
    x, y = b.input("x", (4, 6)), b.input("y", (4, 6))
    y.meta["val"] = x.meta["val"]
    gm = b.finish(b.op(aten.neg.default, x))
    (neg,) = nodes(gm, aten.neg.default)
    with gm.graph.inserting_before(neg):
        out = emit_traced(gm.graph, lambda a, c: a - c, [x, y])
    assert out.target is aten.sub.Tensor and out.args == (x, y)


def test_a_traced_replacement_may_not_make_a_tensor():
    from mla_graph.passes.rewrite import traced

    gm, a, c = _graph(lambda b, a, c: b.op(aten.neg.default, a))
    constant = torch.ones(4, 6)      # a real tensor the code closes over: it would be copied into the graph
    rule = Rule("plus a constant", aten.neg.default, emit=traced(lambda x: x + constant))
    with pytest.raises(ValueError, match="replacement <lambda>: .*pass every tensor it reads in as an argument"):
        rewrite(gm, [rule])


@Pattern
def DOUBLE_THEN_NEG(x):
    return aten.neg.default(aten.mul.Tensor(x, 2.0))


def test_the_matcher_refuses_an_intermediate_read_outside_the_match():
    """Replacing the anchor would leave the intermediate alive for its other reader, computed twice."""
    def build(b, a, c):
        doubled = b.op(aten.mul.Tensor, a, 2.0)
        return b.op(aten.add.Tensor, b.op(aten.neg.default, doubled), doubled)
    gm, a, _ = _graph(build)
    rule = Rule("neg of double", DOUBLE_THEN_NEG, emit=lambda g, m: call(g, aten.mul.Tensor, m.x, -2.0))
    result = rewrite(gm, [rule])
    assert result.matches == 0 and result.notes == ["neg_default: mul_tensor of the match is also read by "
                                                    "add_tensor; not rewritten"]
    # the same op may be declared shared by the pattern: then it is taken, and the reader keeps its value
    shared = Pattern(DOUBLE_THEN_NEG_FN, shared=(aten.mul.Tensor,))
    gm, _, _ = _graph(build)
    assert rewrite(gm, [Rule("neg of double", shared, emit=lambda g, m: call(g, aten.mul.Tensor, m.x, -2.0))]).matches == 1


def DOUBLE_THEN_NEG_FN(x):
    return aten.neg.default(aten.mul.Tensor(x, 2.0))


def test_the_matcher_refuses_a_match_whose_input_is_written_between_its_nodes():
    """The replacement reads the input at the anchor; a write in between would change what it reads."""
    def build(b, a, c):
        doubled = b.op(aten.mul.Tensor, a, 2.0)
        written = b.op(aten.add_.Tensor, a, 1.0)      # a write into the match's input, after its first node
        return b.op(aten.add.Tensor, b.op(aten.neg.default, doubled), written)
    gm, a, _ = _graph(build)
    result = rewrite(gm, [Rule("neg of double", DOUBLE_THEN_NEG, emit=lambda g, m: call(g, aten.mul.Tensor, m.x, -2.0))])
    assert result.matches == 0
    assert result.notes == ["neg_default: add__tensor writes a between the match's nodes; not rewritten"]


def test_a_replacement_is_traced_once_per_abstract_signature(monkeypatch):
    """The trace is kept per signature (dtype, static sizes, which symbolic sizes are equal, literals)
    and replayed: a second match of the same signature traces nothing; another literal, dtype or an
    equality between sizes the code may branch on is traced anew, and each replay is the graph that
    signature's trace makes."""
    import mla_graph.passes.rewrite as rw
    from mla_graph.passes.graph_utils import same_size

    traced_now = []
    trace = rw._trace
    monkeypatch.setattr(rw, "_trace", lambda fn, values, name: traced_now.append(name) or trace(fn, values, name))

    def scaled(x, y, s):      # branches on whether the two row counts are one size
        return x * s if same_size(x.shape[0], y.shape[0]) else x.sum(0) * s

    def emitted(rows_y, s, dtype=torch.float32):
        b = GraphBuilder()
        T = b.sym("T", 4)
        x, y = b.input("x", (T, 6), dtype), b.input("y", (T if rows_y == "T" else b.sym("U", 5), 6), dtype)
        gm = b.finish(b.op(aten.neg.default, x))
        (neg,) = nodes(gm, aten.neg.default)
        with gm.graph.inserting_before(neg):
            out = rw.emit_traced(gm.graph, scaled, [x, y, s], name="scaled")
        return [n.target for n in gm.graph.nodes if n.op == "call_function" and n is not neg], out

    first, _ = emitted("T", 2.0)
    assert emitted("T", 2.0)[0] == first == [aten.mul.Tensor] and len(traced_now) == 1     # replayed
    assert emitted("U", 2.0)[0] == [aten.sum.dim_IntList, aten.mul.Tensor] and len(traced_now) == 2
    ops_3, out = emitted("T", 3.0)
    assert ops_3 == [aten.mul.Tensor] and out.args[1] == 3.0 and len(traced_now) == 3     # another literal
    emitted("T", 2.0, torch.bfloat16)
    assert len(traced_now) == 4                                                            # another dtype


# ---- replacements recorded as written (passes.recording) ---------------------------------------

def _recorded_graph(fn, shapes, **literals):
    """fn recorded in front of a neg of the first input, over inputs of `shapes` (a str is a symbol)."""
    from mla_graph.passes.recording import emit_recorded

    b = GraphBuilder()
    symbols = {}
    values = [b.input(f"x{i}", tuple(symbols.setdefault(s, b.sym(s, 5)) if isinstance(s, str) else s for s in shape))
              for i, shape in enumerate(shapes)]
    gm = b.finish(b.op(aten.neg.default, values[0]))
    (neg,) = nodes(gm, aten.neg.default)
    with gm.graph.inserting_before(neg):
        out = emit_recorded(gm.graph, fn, *values, **literals)
    return gm, values, out


def test_a_recorded_replacement_keeps_the_arguments_as_written():
    """Recorded, an argument equal to the schema's default stays (a trace would drop it: the graph would
    no longer say it); a size read twice is two reads where the code reads it; x.view / x[i] / + * on
    sizes record the one op each means."""
    def fn(x, y, eps):
        n = aten.sym_size.int(x, 0) * 2
        parts = aten.split_with_sizes.default(aten.sum.dim_IntList(x, [1], False).view(-1, 1), [2, 3], 0)
        return aten.mul.Tensor(parts[0], eps), aten.arange.start(0, n + aten.sym_size.int(x, 0), dtype=torch.int64)
    gm, (x, y), (scaled, positions) = _recorded_graph(fn, [(5, 4), (5, 4)], eps=1e-6)
    made = [(n.target, n.args, n.kwargs) for n in gm.graph.nodes if n.op == "call_function"][:-1]
    sizes = [n for n in gm.graph.nodes if n.target is aten.sym_size.int]
    assert len(sizes) == 2
    total, summed, viewed, parts, first = (nodes(gm, t)[0] for t in (
        operator.add, aten.sum.dim_IntList, aten.view.default, aten.split_with_sizes.default, operator.getitem))
    assert made == [
        (aten.sym_size.int, (x, 0), {}), (operator.mul, (sizes[0], 2), {}),
        (aten.sum.dim_IntList, (x, [1], False), {}), (aten.view.default, (summed, [-1, 1]), {}),
        (aten.split_with_sizes.default, (viewed, [2, 3], 0), {}), (operator.getitem, (parts, 0), {}),
        (aten.mul.Tensor, (first, 1e-6), {}), (aten.sym_size.int, (x, 0), {}),
        (operator.add, (nodes(gm, operator.mul)[0], sizes[1]), {}),
        (aten.arange.start, (0, total), {"dtype": torch.int64})]
    assert scaled.meta["val"].shape == (2, 1) and positions.meta["val"].shape == (15,)


def test_a_recorded_replacement_computes_what_its_code_computes_eagerly():
    """The same function, run on real tensors, is the independent check of the graph it recorded."""
    def fn(x, y, scale):
        _, N = x.shape
        return aten._softmax.default(aten.mm.default(x, y.t()) * scale, -1, False).view(-1, 1, N) + x.view(-1, 1, N)
    gm, _, out = _recorded_graph(fn, [("T", 4), (4, 4)], scale=0.5)
    gm.graph.output_node().args = ((out,),)     # the recorded value is the graph's result
    gm.graph.eliminate_dead_code()
    gm.recompile()
    x, y = torch.randn(7, 4), torch.randn(4, 4)
    (got,) = gm(x, y)
    torch.testing.assert_close(got, fn(x, y, 0.5), rtol=0, atol=0)
    # the row count is the graph's symbol, not the 5 the fake value was made with
    assert got.shape == (7, 1, 4)


@pytest.mark.parametrize("fn, error, message", [
    (lambda x: torch.cat([x, x]), TypeError, "calls cat, not an op overload"),
    (lambda x: aten.add.Tensor(x, torch.ones(5, 4)), ValueError, "a tensor made outside the graph meets it in add"),
    (lambda x: x if x else x, TypeError, "the truth of x0 is known only when the graph runs"),
    (lambda x: x[0], TypeError, "indexing x0, which is not a kernel's tuple of outputs"),
    (lambda x: 2 * x, TypeError, "mul with the tensor x0 on the right"),
], ids=["torch-level function", "a tensor made outside", "truth of a tensor", "indexing a tensor", "number * tensor"])
def test_a_recorded_replacement_refuses_what_it_cannot_record(fn, error, message):
    with pytest.raises(error, match=f"replacement <lambda>: {message}"):
        _recorded_graph(fn, [(5, 4)])

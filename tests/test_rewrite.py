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

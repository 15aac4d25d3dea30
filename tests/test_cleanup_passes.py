"""Cleanup passes, tested with the public harness mla_graph.testing.check_pass."""
import pytest
import torch

from mla_graph.passes import eliminate_dead_code, remove_noop_views
from mla_graph.testing import check_pass

aten = torch.ops.aten


def _noop_views(x, w):
    y = aten.view.default(x @ w, [4, 8])          # x @ w is already [4, 8]
    z = aten.reshape.default(y, [4, 8])
    return aten.expand.default(z, [4, 8]).relu()


def _real_views(x, w):
    return aten.view.default(x @ w, [8, 4]).relu()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_remove_noop_views(dtype):
    inputs = (torch.randn(4, 6, dtype=dtype), torch.randn(6, 8, dtype=dtype))
    check = check_pass(remove_noop_views, _noop_views, inputs,
                       expect_absent=["aten.view.default", "aten.reshape.default", "aten.expand.default"],
                       expect_matches=3)
    assert check.record.matches_by_rule == {"view": 1, "reshape": 1, "expand": 1}


def test_remove_noop_views_keeps_real_views():
    check_pass(remove_noop_views, _real_views, (torch.randn(4, 6), torch.randn(6, 8)),
               expect_ops={"aten.view.default": 1}, expect_matches=0, expect_changed=False)


def _dead(x):
    unused = x.exp()  # noqa: F841
    return x + 1


def test_eliminate_dead_code():
    check_pass(eliminate_dead_code, _dead, (torch.randn(3),), expect_absent=["aten.exp.default"],
               expect_ops={"aten.add.Tensor": 1}, expect_matches=1)


def _mutation(cache, x):
    cache.add_(x)   # no user, but a write: must stay
    return x * 2


def test_eliminate_dead_code_keeps_writes():
    check_pass(eliminate_dead_code, _mutation, (torch.zeros(3), torch.ones(3)),
               expect_ops={"aten.add_.Tensor": 1}, expect_changed=False)


def test_harness_catches_a_wrong_rewrite():
    """check_pass's numerics comparison fails when a pass changes results."""
    from mla_graph.passes import PassResult

    def negate_output(gm):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        from mla_graph.passes.graph_utils import call
        with gm.graph.inserting_before(out):
            neg = call(gm.graph, aten.neg.default, out.args[0][0])
        out.args = ([neg],)
        return PassResult(changed=True, matches=1)

    with pytest.raises(AssertionError, match="negate_output changed the numerics"):
        check_pass(negate_output, lambda x: [x + 1], (torch.randn(3),))

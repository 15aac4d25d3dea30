"""No pass, inliner or cleanup of ours drops a side effect (passes.side_effects).

A converted Hugging Face model's attention writes its output with `out.index_copy_(...)`, an
in-place *method* whose result nobody reads; FX's dead-code elimination erased it in the whole-step
inliner and every decode step added zeros for attention, without an error. These tests plant such
erasures and check that they fail loudly (naming the op and the pass), and that our dead-code
elimination keeps every write whose value is seen while still dropping dead temporaries.
"""
import operator

import pytest
import torch
from conftest import V3_TINY
from torch.fx import Graph, GraphModule

from mla_graph import MLAAttention, capture, lower
from mla_graph.passes import PassManager, PassResult, PassVerificationError
from mla_graph.passes.side_effects import effects, eliminate_dead_code, written

aten = torch.ops.aten


def hf_style_graph() -> GraphModule:
    """out = zeros; out.index_copy_(0, index, attended); return out.view(...) (the HF adapter's
    shape: the write's own result is never read)."""
    g = Graph()
    x, index = g.placeholder("x"), g.placeholder("index")
    out = g.call_method("new_zeros", (x, (4, 3)))
    attended = g.call_function(torch.relu, (x,))
    g.call_method("index_copy_", (out, 0, index, attended))
    g.output(g.call_method("view", (out, 2, 6)))
    return GraphModule(torch.nn.Module(), g)


def test_in_place_methods_and_schema_writes_are_seen():
    gm = hf_style_graph()
    copy = next(n for n in gm.graph.nodes if n.target == "index_copy_")
    out = next(n for n in gm.graph.nodes if n.target == "new_zeros")
    assert written(copy) == [out]
    layer = MLAAttention(V3_TINY)
    decode = capture(layer, "decode", block_size=16)
    write = next(n for n in decode.graph.nodes if n.target is torch.ops.mla.cache_write.default)
    assert [n.name for n in written(write)] == ["latent_cache", "rope_cache"]
    assert set(effects(decode.graph).writes) == {n for n in decode.graph.nodes if n.name in ("latent_cache",
                                                                                             "rope_cache")}


def test_our_dead_code_elimination_keeps_a_write_whose_value_is_read():
    gm = hf_style_graph()
    x, index = torch.randn(4, 3), torch.tensor([2, 0, 1, 3])
    want = gm(x, index)
    assert not eliminate_dead_code(gm.graph)
    gm.recompile()
    assert torch.equal(gm(x, index), want) and want.abs().sum() > 0
    # torch.fx's own elimination erases it: the bug this module exists for
    fx = hf_style_graph()
    fx.graph.eliminate_dead_code()
    fx.recompile()
    assert "index_copy_" not in fx.code and torch.equal(fx(x, index), torch.zeros(2, 6))


def test_a_write_into_a_dead_temporary_goes_with_it_but_not_into_an_input():
    g = Graph()
    x, cache = g.placeholder("x"), g.placeholder("cache")
    mask = g.call_method("new_ones", (x, (3, 3)))
    g.call_method("masked_fill_", (mask, g.call_method("bool", (mask,)), 0.0))    # nobody reads mask
    row = g.call_function(operator.getitem, (cache, 0))                             # a view of an input
    g.call_method("copy_", (row, x))
    g.output(g.call_function(torch.relu, (x,)))
    eliminate_dead_code(g)
    assert [n.target for n in g.nodes if n.op == "call_method"] == ["copy_"]


def erase_the_cache_write(gm):
    """A planted bug: the decode graph's cache write is erased (as FX's DCE did to index_copy_)."""
    node = next(n for n in gm.graph.nodes if n.target is torch.ops.mla.cache_write.default)
    for user in list(node.users):
        gm.graph.erase_node(user)
    gm.graph.erase_node(node)
    return PassResult(changed=True, matches=1)


def fx_dead_code(gm):
    """A user's cleanup built on torch.fx's own elimination, which does not know in-place methods."""
    gm.graph.eliminate_dead_code()
    return PassResult(changed=True)


def test_a_pass_that_erases_a_write_fails_naming_the_op_and_the_pass():
    layer = MLAAttention(V3_TINY)
    with pytest.raises(PassVerificationError, match=r"after pass 'erase_the_cache_write': mla\.cache_write\.default "
                                                    r"wrote latent_cache in place and was erased"):
        lower(layer, "npu", ["decode"], block_size=16, passes={"tidy": [erase_the_cache_write]})
    # checked whether the manager verifies or not: a dropped write is a wrong result without an error
    gm = hf_style_graph()
    with pytest.raises(PassVerificationError, match=r"after pass 'fx_dead_code': index_copy_\(\) wrote new_zeros"):
        PassManager([fx_dead_code], verify=False).run(gm)


def test_rewriting_how_a_value_is_written_is_allowed():
    """The npu and torchair targets replace mla::cache_write with a fused kernel, or a functional
    update and a copy back: each still writes both caches."""
    layer = MLAAttention(V3_TINY)
    for target in ("npu", "torchair"):
        gm = lower(layer, target, ["decode"], block_size=16).graphs["decode"]
        assert {n.name for n in effects(gm.graph).writes} == {"latent_cache", "rope_cache"}, target


def test_the_whole_step_inliner_fails_if_a_write_is_lost(monkeypatch):
    """inline_layers checks every write of Dynamo's graph and of each layer's graph after its
    cleanup; with FX's elimination in its place, the HF adapter's index_copy_ is caught."""
    from mla_graph.runtime import whole_step

    def fx_elimination(graph):
        return graph.eliminate_dead_code()
    monkeypatch.setattr(whole_step, "eliminate_dead_code", fx_elimination)
    gm = hf_style_graph()
    with pytest.raises(PassVerificationError, match=r"after pass 'inline_layers': index_copy_\(\) wrote new_zeros"):
        whole_step.inline_layers(gm, [])

"""What the cheaper lowering still checks: the verifier re-runs only changed nodes (and catches every
way a pass can change one), a re-bound graph is checked for the tensors it reads."""
import functools

import pytest
import torch
from conftest import V3_TINY

from mla_graph.contract import graph_meta
from mla_graph import MLAAttention, capture, lower
from mla_graph.model_lowering import lower_layers, rebind
from mla_graph.passes import PassManager, PassResult, PassVerificationError, verify_graph

aten, mla = torch.ops.aten, torch.ops.mla


def _graph():
    return capture(MLAAttention(V3_TINY), "decode", block_size=16)


def _first_call(gm, target):
    return next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def nothing(gm):
    return PassResult(changed=False)


def wrong_val(gm):
    """A new meta['val'] of the wrong shape on a node the verifier already passed."""
    node = next(n for n in gm.graph.nodes if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor)
                and n.meta["val"].dim() == 2)
    val = node.meta["val"]
    node.meta["val"] = val.new_empty(val.shape[0], val.shape[1] + 1)
    return PassResult(changed=True, matches=1)


def swapped_input(gm):
    """attention(q, k, q, ...): the args change, the recorded value no longer fits them."""
    node = _first_call(gm, mla.attention.default)
    q = node.args[0]
    node.args = (q, node.args[1], q, *node.args[3:])
    return PassResult(changed=True, matches=1)


def input_val_changed(gm):
    """A graph input's meta['val'] is replaced (inputs are not re-run themselves): every user of it
    must be re-run, although the users are untouched."""
    node = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.target == "hidden_states")
    val = node.meta["val"]
    node.meta["val"] = val.new_empty(val.shape[0], val.shape[1] + 1)
    return PassResult(changed=True, matches=1)


def retargeted(gm):
    """The node's op is swapped in place (same args): aten.bmm where the value was mm's."""
    node = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target in (aten.mm.default,
                                                                                       aten.linear.default))
    node.target = aten.bmm.default
    return PassResult(changed=True, matches=1)


@pytest.mark.parametrize("broken", [wrong_val, swapped_input, input_val_changed, retargeted])
def test_verifier_skips_nothing_a_pass_changed(broken):
    """Every node is verified after capture and after `nothing`; the broken pass then changes a node
    (or an input's value) the memo had passed: the manager still names the pass."""
    gm = _graph()
    with pytest.raises(PassVerificationError, match=broken.__name__):
        PassManager([nothing, broken]).run(gm)


def test_memo_gives_the_full_verifiers_answer():
    """A memo filled on the unchanged graph gives what verify_graph without one gives, on the
    same graph and after a breaking rewrite."""
    gm = _graph()
    passed: dict = {}
    assert verify_graph(gm, passed) == [] and passed
    assert verify_graph(gm, passed) == []
    swapped_input(gm)
    full = verify_graph(gm)
    assert full and [n for n, _ in verify_graph(gm, passed)] == [n for n, _ in full]


def test_verified_lowering_reruns_fewer_fake_calls(monkeypatch):
    """The memo is what makes the verifier cheaper: fewer fake re-runs than nodes x passes, same graph."""
    import mla_graph.passes.verifier as verifier
    runs = []
    real = verifier._check_call
    monkeypatch.setattr(verifier, "_check_call", lambda node: runs.append(node) or real(node))
    layer = MLAAttention(V3_TINY)
    lowered = lower(layer, "npu", ["decode"], block_size=16)
    gm = lowered.graphs["decode"]
    calls = sum(n.op == "call_function" for n in gm.graph.nodes)
    passes_run = len(lowered.reports["decode"].records)
    assert 0 < len(runs) < calls * passes_run


def _bad_recipe(weight, cut):
    return cut(weight)[..., :-1]   # one column short: a recipe that cuts the wrong shape


def test_rebind_checks_the_tensors_the_graph_reads():
    """A recipe whose constant does not match the node's recorded shape fails the rebind, naming it."""
    layers = [MLAAttention(V3_TINY), MLAAttention(V3_TINY)]
    template = lower(layers[0], "npu", ["decode"], block_size=16)
    recipes = graph_meta(template.graphs["decode"]).derived_constants
    name, (source, cut) = next((k, v) for k, v in recipes.items() if v is not None)
    recipes[name] = (source, functools.partial(_bad_recipe, cut=cut))
    with pytest.raises(PassVerificationError, match="rebind.*decode graph re-bound"):
        rebind(template, layers[1])
    rebind(template, layers[1], verify=False)   # unchecked on request


def test_lower_layers_keeps_the_templates_checked_mode():
    layers = [MLAAttention(V3_TINY), MLAAttention(V3_TINY)]
    template = lower(layers[0], "reference", ["decode"], block_size=16, checked=False)
    assert rebind(template, layers[1]).checked is False
    assert all(low.checked is None for low in lower_layers(layers, "reference", ["decode"], block_size=16))

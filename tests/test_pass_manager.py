"""The pass manager: dumps only on change, provenance, the verifier names a broken pass."""
import json
import stat

import pytest
import torch
from conftest import V3_TINY

from mla_graph import MLAAttention, capture
from mla_graph.passes import (PassManager, PassResult, PassVerificationError, eliminate_dead_code, graph_pass,
                    has_ops, no_namespace, no_ops)
from mla_graph.passes.graph_utils import call

aten, mla = torch.ops.aten, torch.ops.mla


def _graph():
    return capture(MLAAttention(V3_TINY), "decode", block_size=16)


def nothing(gm):
    return PassResult(changed=False)


def double_output(gm):
    """Multiplies the output by 2: a real change that creates one node."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    value = out.args[0]
    with gm.graph.inserting_before(out):
        doubled = call(gm.graph, aten.mul.Tensor, value, 2.0)
    out.args = (doubled,)
    result = PassResult(changed=False)
    result.count("double")
    return result


def test_dumps_only_on_change_and_provenance(tmp_path):
    gm = _graph()
    report = PassManager([nothing, double_output, eliminate_dead_code], dump_dir=tmp_path).run(gm)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["00-capture.txt", "02-double_output.after.txt", "02-double_output.before.txt", "summary.json"]
    after = (tmp_path / "02-double_output.after.txt").read_text()
    assert "aten.mul.Tensor" in after and "aten.mul.Tensor" not in (tmp_path / "02-double_output.before.txt").read_text()
    assert [(r.name, r.changed, r.matches, r.created) for r in report.records] == [
        ("nothing", False, 0, 0), ("double_output", True, 1, 1), ("eliminate_dead_code", False, 0, 0)]
    made = [n for n in gm.graph.nodes if n.meta.get("mla_pass") == "double_output"]
    assert [n.target for n in made] == [aten.mul.Tensor]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [p["name"] for p in summary["passes"]] == ["nothing", "double_output", "eliminate_dead_code"]
    assert "double_output" in report.table()


def test_a_second_run_into_the_folder_leaves_none_of_the_first_runs_dumps(tmp_path):
    """A pass that changes nothing writes nothing, so the manager's files of an earlier run go
    first (files it does not write stay); every file is readable as a plain open() leaves it."""
    PassManager([double_output], dump_dir=tmp_path).run(_graph())
    (tmp_path / "notes.txt").write_text("mine")
    PassManager([nothing, eliminate_dead_code], dump_dir=tmp_path).run(_graph())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00-capture.txt", "notes.txt", "summary.json"]
    plain = stat.S_IMODE((tmp_path / "notes.txt").stat().st_mode)
    assert {stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()} == {plain}


def test_a_bad_dump_format_fails_with_or_without_a_dump_folder(tmp_path):
    for dump_dir in (None, tmp_path):
        with pytest.raises(ValueError, match=r"unknown dump format\(s\) \['pdf'\]; expected .*txt, dot, svg, html"):
            PassManager([nothing], dump_dir=dump_dir, formats="txt,pdf")


def broken_shape(gm):
    """Swaps an attention's value input for its query: the recorded fake value is now wrong."""
    node = next(n for n in gm.graph.nodes if n.target is mla.attention.default)
    q = node.args[0]
    node.args = (q, node.args[1], q, *node.args[3:])
    return PassResult(changed=True, matches=1)


def test_verifier_names_the_broken_pass_and_node():
    with pytest.raises(PassVerificationError) as info:
        PassManager([nothing, broken_shape]).run(_graph())
    err = info.value
    assert err.pass_name == "broken_shape" and err.node.name == "attention"
    assert "after pass 'broken_shape'" in str(err) and "meta['val']" in str(err)


def forgets_fake_value(gm):
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        node = gm.graph.call_function(aten.neg.default, (out.args[0],))
    out.args = (node,)
    return PassResult(changed=True)


def test_verifier_requires_fake_values():
    with pytest.raises(PassVerificationError, match="after pass 'forgets_fake_value': has no meta\\['val'\\].*neg"):
        PassManager([forgets_fake_value]).run(_graph())


def lies_about_change(gm):
    double_output(gm)
    return PassResult(changed=False)


def test_pass_that_hides_a_change_is_caught():
    with pytest.raises(PassVerificationError, match="'lies_about_change': the graph changed but the pass reported changed=False"):
        PassManager([lies_about_change]).run(_graph())


@graph_pass(ensures=[no_namespace("mla")])
def claims_full_lowering(gm):
    return PassResult(changed=False)


@graph_pass(requires=[has_ops(aten.bmm.default)])
def needs_bmm(gm):
    return PassResult(changed=False)


@graph_pass(ensures=[no_ops(mla.rope.default)])
def claims_rope_lowered(gm):
    return PassResult(changed=False)


def test_requires_and_ensures_are_checked():
    with pytest.raises(PassVerificationError, match="'claims_rope_lowered': ensures .*mla.rope.default must not appear"):
        PassManager([claims_rope_lowered]).run(_graph())
    with pytest.raises(PassVerificationError, match="'claims_full_lowering': ensures 'no mla:: op': mla.rms_norm.default is still"):
        PassManager([claims_full_lowering]).run(_graph())
    with pytest.raises(PassVerificationError, match="'needs_bmm': requires .*aten.bmm.default is required but absent"):
        PassManager([needs_bmm]).run(_graph())


def test_a_pass_must_return_a_pass_result():
    with pytest.raises(TypeError, match="pass 'returns_bool' returned bool; a pass returns a PassResult"):
        def returns_bool(gm):
            return True
        PassManager([returns_bool]).run(_graph())


def test_provenance_from_fx_node_hooks():
    """Created, erased, replaced and edited-in-place, as torch.fx's hooks report them: a node made
    and dropped within the pass is in neither list; an edited node records the pass."""
    def rewrite(gm):
        g = gm.graph
        out = next(n for n in g.nodes if n.op == "output")
        final = out.args[0]                                   # o_proj's linear
        with g.inserting_before(out):
            scratch = call(g, aten.mul.Tensor, final, 1.0)    # made, then dropped
            halved = call(g, aten.mul.Tensor, final, 0.5)
            doubled = call(g, aten.mul.Tensor, halved, 2.0)
        g.erase_node(scratch)
        final.replace_all_uses_with(doubled)                  # the output, and halved, now read doubled
        halved.args = (final, 0.5)                            # edited in place: back to the linear
        return PassResult(changed=True)

    gm = _graph()
    (record,) = PassManager([rewrite]).run(gm).records
    assert record.created_nodes == ["mul_tensor_1", "mul_tensor_2"] and record.created == 2
    assert record.erased == 0
    assert sorted(record.replaced) == ["linear_4 -> mul_tensor_2 in mul_tensor_1",
                                       "linear_4 -> mul_tensor_2 in output"]
    assert record.edited_nodes == ["output"]                   # the new nodes are created, not edited
    output = next(n for n in gm.graph.nodes if n.op == "output")
    assert output.meta["mla_edited_by"] == ["rewrite"]


def test_a_pass_that_swaps_the_graph_is_named():
    """Provenance needs the graph edited in place (the hooks are on it): a pass that installs
    another graph is stopped, naming it."""
    import copy

    def swaps(gm):
        gm.graph = copy.deepcopy(gm.graph)
        return PassResult(changed=True)

    with pytest.raises(PassVerificationError, match="after pass 'swaps'.*outside the graph's own create/erase"):
        PassManager([swaps]).run(_graph())

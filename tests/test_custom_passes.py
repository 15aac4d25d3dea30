"""Users' own passes: lower(..., passes=), Target.extended, named stages, and docs/writing-a-pass.md
run as written."""
import pathlib
import re

import pytest
import torch
from conftest import V3_TINY, randomize

from mla_graph.contract import graph_meta
from mla_graph import MLAAttention, lower
from mla_graph.checking import compare_with_plain
from mla_graph.targets import STAGES, TARGETS, pipeline
from mla_graph.passes import PassResult, PassVerificationError, pass_name
from mla_graph.passes.graph_utils import call

aten = torch.ops.aten
DOC = pathlib.Path(__file__).parent.parent / "docs" / "writing-a-pass.md"


@pytest.fixture(scope="module")
def doc_scope():
    """Every python block of the page, run in order in one namespace."""
    scope: dict = {}
    for i, code in enumerate(re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)):
        exec(compile(code, f"docs/writing-a-pass.md block {i}", "exec"), scope)
    return scope


def test_the_page_runs_as_written(doc_scope, monkeypatch):
    assert doc_scope["check"].record.matches_by_rule == {"o_proj in float32": 1}
    assert doc_scope["mm_check"].record.matches_by_rule == {"linear -> mm": 1}
    # the page's Before/Expected check fails on a wrong expectation
    from mla_graph.testing import check_pass
    x, w = torch.randn(5, 16), torch.randn(12, 16)
    with pytest.raises(AssertionError, match="graphs differ"):
        check_pass(doc_scope["linear_to_mm"], lambda x, w: torch.nn.functional.linear(x, w), [x, w],
                   expect_graph=lambda x, w: torch.mm(x, w.t().contiguous()))
    # the pattern rule matched the q norm (its input now float32), not the kv norm before the cache write
    after = doc_scope["norm_check"].after
    assert doc_scope["norm_check"].record.matches_by_rule == {"rms_norm in float32 before a linear": 1}
    norms = [n for n in after.graph.nodes if n.target is torch.ops.mla.rms_norm.default]
    assert sorted(str(n.args[0].meta["val"].dtype) for n in norms) == ["torch.bfloat16", "torch.float32"]
    assert "writing-a-pass.md block" in doc_scope["NORM_FP32"].defined_at   # where the rule was written
    # the page's recorded rule keeps eps as written, even where it equals the kernel's default
    from pass_graphs import GraphBuilder
    import mla_graph.npu  # noqa: F401  (registers torch.ops.npu)
    from mla_graph.passes.rewrite import rewrite
    b = GraphBuilder()
    x, gamma = b.input("x", (5, 16), torch.bfloat16), b.input("gamma", (16,), torch.bfloat16)
    gm = b.finish(b.op(torch.ops.mla.rms_norm.default, x, gamma, 1e-6))
    assert rewrite(gm, [doc_scope["RMS_NORM"]]).matches_by_rule == {"rms_norm": 1}
    (norm,) = [n for n in gm.graph.nodes if n.target is torch.ops.npu.npu_rms_norm.default]
    assert norm.args == (x, gamma, 1e-6)
    names = [r.name for r in doc_scope["lowered"].reports["decode"].records]
    assert names[:3] == ["remove_noop_views", "o_proj_in_float32", "split_mixed_batch"]
    # the page's own target: registered under its name, the npu pipeline plus the pass after "tidy"
    extended = TARGETS.pop("npu-o-proj-fp32")
    assert [pass_name(p) for p in extended.pipeline("decode")] == \
        ["remove_noop_views", "o_proj_in_float32"] + [pass_name(p) for p in pipeline("npu", "decode")][1:]
    # what the page prints is what the code gives
    assert "('tidy', 'split-mixed', 'choose-npu-form', 'absorb-page', 'npu-kernels', 'finish', 'check-lowered')" \
        in DOC.read_text() and TARGETS["npu"].stages("decode") == (
            "tidy", "split-mixed", "choose-npu-form", "absorb-page", "npu-kernels", "finish", "check-lowered")


def test_the_pages_pass_keeps_the_layer_right(doc_scope):
    """The bf16 layer lowered with the page's pass still computes MLA (checked against the plain
    definition), and its o_proj really runs in float32."""
    layer = randomize(MLAAttention(V3_TINY, dtype=torch.bfloat16))
    lowered = lower(layer, "npu", block_size=16, passes={"tidy": [doc_scope["o_proj_in_float32"]]})
    for phase in ("decode", "prefill", "mixed"):
        assert compare_with_plain(layer, lowered, phase, seed=0).ok, phase
        gm = lowered.graphs[phase]
        linears = [n for n in gm.graph.nodes if n.target is aten.linear.default
                   and getattr(n.args[1], "op", None) != "get_attr"]
        assert len(linears) == 1 and linears[0].meta["val"].dtype == torch.float32


def counting_pass(seen):
    def count(gm):
        seen.append(graph_meta(gm).phase)
        return PassResult(changed=False)
    return count


@pytest.mark.parametrize("target, last", [("reference", "remove_noop_views"), ("cpu", "lower_attention_to_cpu"),
                                          ("npu", "lower_paged_attention_to_aten"),
                                          ("torchair", "decompose_linear")])
def test_a_list_runs_after_the_last_rewriting_stage(target, last):
    seen = []
    mine = counting_pass(seen)
    lowered = lower(MLAAttention(V3_TINY), target, ["decode", "prefill"], block_size=16, passes=[mine])
    # a target that picks the form per call has a second prefill graph (the other form): the pass runs there too
    assert seen == ["decode", "prefill"] + (["prefill"] if TARGETS[target].form_per_call else [])
    names = [r.name for r in lowered.reports["decode"].records]
    assert names[names.index("count") - 1] == last
    assert names[names.index("count") + 1] == "eliminate_dead_code"
    # the target itself is unchanged
    assert "count" not in [pass_name(p) for p in TARGETS[target].pipeline("decode")]


def test_bad_passes_say_what_is_allowed():
    layer = MLAAttention(V3_TINY)
    mine = counting_pass([])
    with pytest.raises(ValueError, match="unknown stage 'absorb' for target 'npu'; its stages: tidy, split-mixed"):
        lower(layer, "npu", ["decode"], passes={"absorb": [mine]})
    with pytest.raises(ValueError, match="passes must be a list of passes .* or a dict"):
        lower(layer, "npu", ["decode"], passes=mine)
    with pytest.raises(ValueError, match="passes after stage 'tidy' must be a list of passes"):
        lower(layer, "npu", ["decode"], passes={"tidy": mine})
    with pytest.raises(ValueError, match="passes must be a list"):
        lower(layer, "npu", ["decode"], passes=["not a pass"])


def linear_to_matmul(gm):
    """Every aten.linear as matmul with the transposed weight (same math, another pattern)."""
    result = PassResult(changed=False)
    g = gm.graph
    for node in list(g.nodes):
        if node.op == "call_function" and node.target is aten.linear.default:
            with g.inserting_before(node):
                out = call(g, aten.matmul.default, node.args[0], call(g, aten.t.default, node.args[1]))
            node.replace_all_uses_with(out)
            g.erase_node(node)
            result.count("linear -> matmul")
    return result


@pytest.mark.parametrize("target, chooser", [("cpu", "choose_attention_form"), ("npu", "choose_npu_attention_form"),
                                             ("torchair", "choose_npu_attention_form")])
def test_a_pass_that_hides_the_pattern_is_stopped_not_ignored(target, chooser):
    """Placed before the cost model, a rewrite of kv_b_proj's linear would leave the decompressed
    form in place (the cost model and absorb match aten.linear): the manager stops instead. After
    absorb-page the same pass is fine."""
    layer = randomize(MLAAttention(V3_TINY))
    with pytest.raises(PassVerificationError, match=f"after pass '{chooser}'.*not in the pattern the cost model"):
        lower(layer, target, ["decode"], block_size=16, passes={"tidy": [linear_to_matmul]})
    lowered = lower(layer, target, ["decode"], block_size=16, passes={"absorb-page": [linear_to_matmul]})
    assert compare_with_plain(layer, lowered, "decode", seed=0).ok
    assert graph_meta(lowered.graphs["decode"]).attention_form == "absorbed"


def test_pipelines_are_their_stages():
    """Every target's pipeline is the concatenation of its stages, for every phase."""
    for name, target in TARGETS.items():
        for phase in ("prefill", "decode", "mixed"):
            stages = target.stages(phase)
            assert all(s in STAGES for s in stages), (name, phase, stages)
            assert target.pipeline(phase) == [p for s in stages for p in STAGES[s]]
    with pytest.raises(ValueError, match="unknown target 'gpu'"):
        pipeline("gpu", "decode")


def reads_after_copy_back(gm):
    """Adds a read of the latent cache input at the end of the graph (folded into the output with
    weight 0), after the copy back: in GE the Assign runs last, so that read would see other values."""
    result = PassResult(changed=False)
    g = gm.graph
    out = next(n for n in g.nodes if n.op == "output")
    cache = next(n for n in g.nodes if n.op == "placeholder" and n.name == "latent_cache")
    with g.inserting_before(out):
        peek = call(g, aten.sum.default, call(g, aten.slice.Tensor, cache, 0, 0, 1))
        new = call(g, aten.add.Tensor, out.args[0], call(g, aten.mul.Tensor, peek, 0.0))
    out.args = (new,)
    result.count("read after copy back")
    return result


def reads_the_old_cache(gm):
    """Points the attention back at the cache input instead of the functional write's output."""
    result = PassResult(changed=False)
    for node in list(gm.graph.nodes):
        if node.target is aten.copy_.default and node.args[0].op == "placeholder":
            cache, updated = node.args
            for user in list(updated.users):
                if user is not node:
                    user.replace_input_with(updated, cache)
                    result.count("stale read")
    return result


@pytest.mark.parametrize("bad, message", [(reads_after_copy_back, "after its copy back"),
                                          (reads_the_old_cache, "as it was before")])
def test_cache_writeback_order_is_checked_after_any_pass(bad, message):
    """torchair decode graphs write caches functionally and copy them back last; a pass (a user's
    included, wherever it runs) that breaks that order is stopped by the final check."""
    from conftest import V3_NPU
    layer = MLAAttention(V3_NPU, dtype=torch.bfloat16)
    lower(layer, "torchair", ["decode"], block_size=16)    # as it is: fine
    with pytest.raises(PassVerificationError, match=f"after pass 'check_fully_lowered'.*{message}"):
        lower(layer, "torchair", ["decode"], block_size=16, passes=[bad])


def test_rules_through_the_one_driver():
    """passes.rewrite: the first rule that anchors and checks wins, each match is counted under its
    rule with the file:line it was defined at (into the pass record and the dumps), and a node no
    rule checks is left as it is."""
    from mla_graph.passes.rewrite import Rule, rewrite
    from mla_graph.testing import check_pass

    line = __import__("inspect").currentframe().f_lineno
    square_only = Rule("square mm", aten.mm.default, check=lambda n: n.args[0] is n.args[1],
                       emit=lambda g, n: call(g, aten.pow.Tensor_Scalar, n.args[0], 2))   # never for mm here
    mm_as_matmul = Rule("mm -> matmul", aten.mm.default,
                        emit=lambda g, n: call(g, aten.matmul.default, *n.args))
    assert mm_as_matmul.defined_at == f"tests/test_custom_passes.py:{line + 3}"

    def mine(gm):
        return rewrite(gm, [square_only, mm_as_matmul])

    def build(x, w):
        return torch.ops.aten.mm.default(x, w).relu()

    check = check_pass(mine, build, (torch.randn(4, 6), torch.randn(6, 8)),
                       expect_ops={"aten.matmul.default": 1, "aten.mm.default": 0}, expect_matches=1)
    assert check.record.matches_by_rule == {"mm -> matmul": 1}
    assert check.record.rule_sources == {"mm -> matmul": mm_as_matmul.defined_at}
    # our own passes built on it carry their rules' sources into the records
    lowered = lower(MLAAttention(V3_TINY), "torchair", ["decode"], block_size=16)
    record = next(r for r in lowered.reports["decode"].records if r.name == "decompose_linear")
    assert record.matches_by_rule == {"linear -> mm": 4}   # q_a, q_b, kv_a, o_proj (kv_b_proj is absorbed)
    assert record.rule_sources["linear -> mm"].startswith("passes/torchair_lower.py:")


def test_the_pages_rule_equals_its_pass(doc_scope):
    """The page's pass written as a rule gives the same graph as the hand-written one."""
    from mla_graph import capture

    layer = MLAAttention(V3_TINY, dtype=torch.bfloat16)
    a, b = capture(layer, "decode", block_size=16), capture(layer, "decode", block_size=16)
    assert doc_scope["o_proj_in_float32"](a).matches == 1
    assert doc_scope["o_proj_in_float32_by_rule"](b).matches == 1
    a.recompile(), b.recompile()
    assert a.code == b.code

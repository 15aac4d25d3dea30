"""check_torchair, `mla-graph check` and tools/sync_ge_converters.py.

Each converter-list rule gets a graph built to break it; the expected node names and ops are read
off the graph independently of the checker. Those tests pass toolchain=False, so they test the
converter list alone on any host. The wheel's checks (torchair's real converters, the GE IR's
dtype lists, the wheel's meta functions, the documented kernel limits) are tested on a real
DeepSeek-V3 bucket graph and on graphs built to break them, with the torch-npu 2.13.0 wheel
(downloaded once; the tests fail without it unless MLA_GRAPH_OFFLINE=1)."""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest
import torch
from conftest import V3_NPU, V3_TINY, randomize
from torch.fx.experimental.proxy_tensor import make_fx

from mla_graph import MLAAttention, MLAConfig, ascend_toolchain, capture, lower
from mla_graph.cache import PagedLatentCache
from mla_graph.cli import main
from mla_graph.npu import ensure_npu_ops, limits
from mla_graph.torchair_compat import (AIR_SCHEMAS, RULES, check_torchair, ensure_air_ops, load_converters,
                                       parse_table)
from mla_graph.testing import trace
from mla_graph.stacks import torch_npu_release

NPU = torch_npu_release()   # the torch-npu release of the running torch's stack

ROOT = pathlib.Path(__file__).parent.parent
FIA_AIR = "air.npu_fused_infer_attention_score.default"
# what the report claims to have checked, once per check that ran (the statements' openings)
WHEEL_CHECKS = ("GE conversion with torchair's own converters", "GE input dtypes against the IR's TensorType lists",
                "npu:: fake kernels against the wheel's meta functions", "documented kernel limits")


def converter_list(gm, **kwargs):
    """The converter-list rules alone, whatever this host has."""
    return check_torchair(gm, toolchain=False, **kwargs)


def _only(report, rule):
    found = [f for f in report.findings if f.rule == rule]
    assert found, report.table()
    return found


def _call_nodes(gm, prefix):
    return [n.name for n in gm.graph.nodes if n.op == "call_function" and str(n.target).startswith(prefix)]


# ---- the vendored data ---------------------------------------------------------------------------

def test_vendored_converter_list_knows_the_mla_kernels():
    table = load_converters()
    assert table.version == NPU
    expected = {
        "npu.npu_fused_infer_attention_score.default": "real",
        "npu.npu_kv_rmsnorm_rope_cache_v2_functional.default": "real",
        "npu.npu_mla_prolog_v3_functional.default": "real",
        "npu.npu_interleave_rope.default": "real",
        "npu.npu_rotary_mul.default": "partial",
        "aten.index_put_.default": "stub",
        "aten.mm.default": "real",
        "aten.sym_size.int": "real",
        "air.wait_tensor.default": "real",
    }
    assert {op: table.kind(op) for op in expected} == expected
    assert table.kind("npu.npu_kv_rmsnorm_rope_cache_v2.default") is None   # in-place form: none
    assert not [k for k in table.kinds if k.startswith("atb.")]


# ---- one graph per rule --------------------------------------------------------------------------

def test_index_put_from_setitem_is_reported_with_cache_write_suggestion():
    def build(cache, idx, v):
        cache = cache.clone()
        cache[idx] = v
        return cache

    gm = trace(build, (torch.zeros(8, 4), torch.tensor([1, 5]), torch.ones(2, 4)))
    report = converter_list(gm)
    [finding] = report.findings
    assert (finding.rule, finding.node) == ("index-put", _call_nodes(gm, "aten.index_put")[0])
    assert "npu_scatter_nd_update_" in finding.suggestion and "scatter_update_" in finding.suggestion
    assert not report.ok


def test_stub_converter():
    gm = trace(lambda x: torch.roll(x, 1, 0) + 1, (torch.randn(4, 6),))
    [finding] = converter_list(gm).findings
    assert (finding.rule, finding.node, finding.op) == ("stub-converter", _call_nodes(gm, "aten.roll")[0],
                                                        "aten.roll.default")
    assert "real GE converter" in finding.suggestion


def test_partial_converter():
    gm = trace(lambda w, i: torch.nn.functional.embedding(i, w), (torch.randn(10, 4), torch.tensor([1, 3])))
    [finding] = converter_list(gm).findings
    assert (finding.rule, finding.op) == ("partial-converter", "aten.embedding.default")
    assert NPU in finding.suggestion


def test_no_converter_for_an_aten_op_outside_the_list():
    gm = trace(lambda x: torch.histc(x, bins=4), (torch.rand(16),))
    assert load_converters().kind("aten.histc.default") is None
    [finding] = converter_list(gm).findings
    assert (finding.rule, finding.node, finding.op) == ("no-converter", "histc", "aten.histc.default")
    assert finding.message == "no GE converter registered in torchair" and "real GE converter" in finding.suggestion


def test_python_level_nodes():
    gm = torch.fx.symbolic_trace(lambda x: x.relu()[0])   # a call_method and operator.getitem
    [finding] = converter_list(gm).findings
    assert (finding.rule, finding.node, finding.op) == ("no-converter", "relu", "Tensor.relu")
    assert "aten" in finding.suggestion


def test_composite_ops_are_judged_by_their_decomposition():
    clean = trace(lambda x, w: torch.nn.functional.linear(x, w), (torch.randn(4, 6), torch.randn(8, 6)))
    assert _call_nodes(clean, "aten.linear") and load_converters().kind("aten.linear.default") is None
    assert converter_list(clean).ok    # t + mm, both with converters
    padded = trace(lambda x: torch.nn.functional.pad(x, (1, 1)), (torch.randn(4, 6),))
    [finding] = converter_list(padded).findings
    assert (finding.rule, finding.op) == ("partial-converter", "aten.pad.default")
    assert "aten.constant_pad_nd.default (partial)" in finding.message


def test_atb_ops_get_their_torch_npu_replacement():
    ensure_npu_ops()
    g = torch.fx.Graph()
    key, value, kc, vc, slots = (g.placeholder(n) for n in ("key", "value", "key_cache", "value_cache", "slots"))
    write = g.call_function(torch.ops.atb._npu_reshape_and_cache.default, (key, value, kc, vc, slots))
    wrapped = g.call_function(torch.ops.higher_order.auto_functionalized_v2,
                              (torch.ops.atb._npu_reshape_and_cache.default,))
    g.output(None)
    report = converter_list(torch.fx.GraphModule({}, g))
    assert [(f.rule, f.node) for f in report.findings] == [("atb-op", write.name), ("atb-op", wrapped.name)]
    assert report.findings[0].suggestion == "npu_kv_rmsnorm_rope_cache (PA) or scatter_update_"


def test_unpaired_scopes_are_reported_at_the_unmatched_node():
    assert ensure_air_ops() in ("emulated", "torchair")
    air = torch.ops.air
    g = torch.fx.Graph()
    x = g.placeholder("x")
    stray_exit = g.call_function(air.scope_exit.default, ())
    g.call_function(air.scope_enter.default, (["_user_stream_label"], ["1"]))      # outer, closed
    g.call_function(air.scope_enter.default, (["_super_kernel_scope"], ["sk"]))    # inner, closed
    y = g.call_function(air.wait_tensor.default, (x, x))
    g.call_function(air.scope_exit.default, ())
    g.call_function(air.scope_exit.default, ())
    left_open = g.call_function(air.scope_enter.default, (["_user_stream_label"], ["2"]))
    g.output(y)
    report = converter_list(torch.fx.GraphModule({}, g))
    assert [(f.rule, f.node, f.op) for f in report.findings] == [
        ("unpaired-scope", stray_exit.name, "air.scope_exit.default"),
        ("unpaired-scope", left_open.name, "air.scope_enter.default")]
    assert "pairs" in report.findings[0].suggestion


def test_ensure_air_ops_registers_torchairs_schemas_as_host_kernels():
    ensure_air_ops()
    for name, schema in AIR_SCHEMAS.items():
        expected = torch._C.parse_schema("air::" + schema)   # torch prints defaults its own way ("1." for 1.0)
        assert str(getattr(torch.ops.air, name).default._schema) == str(expected)
    x = torch.randn(3)
    y = torch.ops.air.wait_tensor(x, torch.randn(2))
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()
    torch.ops.air.scope_enter(["k"], ["v"])
    torch.ops.air.scope_exit()

    def build(x):   # the markers return nothing: they must survive dead-code elimination
        torch.ops.air.scope_enter(["_user_stream_label"], ["1"])
        y = x * 2
        torch.ops.air.scope_exit()
        return y

    gm = make_fx(build)(torch.randn(2))
    gm.graph.eliminate_dead_code()
    assert _call_nodes(gm, "air.scope") == ["scope_enter", "scope_exit"]
    assert converter_list(gm).ok


def test_dynamic_dims_name_the_placeholder_and_dim():
    gm = make_fx(lambda x, w: x @ w, tracing_mode="symbolic")(torch.randn(5, 6), torch.randn(6, 7))
    report = converter_list(gm)
    assert [(f.rule, f.op) for f in report.findings] == [("dynamic-dim", "placeholder")] * 2
    x_name, w_name = (n.name for n in gm.graph.nodes if n.op == "placeholder")
    assert [f.node for f in report.findings] == [x_name, w_name]
    assert "dim 0" in report.findings[0].message and "dim 1" in report.findings[0].message
    assert "bucket" in report.findings[0].suggestion
    assert converter_list(gm, static_dims=False).ok


# ---- MLA graphs, converter list ------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_layer():
    return randomize(MLAAttention(V3_TINY))


@pytest.fixture(scope="module")
def npu_layer():
    """Dims the NPU kernels admit (FIA MLA, interleave rope, the fused cache writer), 8 heads."""
    return randomize(MLAAttention(V3_NPU, dtype=torch.bfloat16))


def test_captured_plain_graph_lists_every_mla_primitive(tiny_layer):
    gm = capture(tiny_layer, "decode", block_size=16)
    report = converter_list(gm)
    primitives = _call_nodes(gm, "mla.")
    assert len(primitives) >= 5
    flagged = [f for f in report.findings if f.rule == "no-converter"]
    assert [f.node for f in flagged] == primitives
    assert all(f.suggestion == "lower it first (target npu/torchair)" for f in flagged)
    dynamic = {f.node: f.message for f in _only(report, "dynamic-dim")}
    assert "dim 0" in dynamic["hidden_states"]
    assert {f.rule for f in report.findings} == {"no-converter", "dynamic-dim"}


def test_npu_decode_graph_flags_only_the_in_place_cache_writer(npu_layer):
    gm = lower(npu_layer, "npu", ["decode"], block_size=128).graph_for("decode")
    kernels = {op: _call_nodes(gm, op) for op in ("npu.npu_fused_infer_attention_score", "npu.npu_interleave_rope",
                                                  "npu.npu_kv_rmsnorm_rope_cache_v2")}
    assert all(kernels.values()), kernels     # the eager kernels are there, and only the writer is rejected
    report = converter_list(gm, static_dims=False)
    [finding] = report.findings
    assert (finding.rule, finding.op) == ("no-converter", "npu.npu_kv_rmsnorm_rope_cache_v2.default")
    assert finding.node == kernels["npu.npu_kv_rmsnorm_rope_cache_v2"][0]
    assert "npu.npu_kv_rmsnorm_rope_cache_v2_functional.default" in finding.suggestion
    assert _only(converter_list(gm), "dynamic-dim")


def test_report_table_and_json_say_what_was_checked():
    gm = trace(lambda x: torch.roll(x, 1, 0), (torch.randn(4, 6),))
    report = converter_list(gm)
    lines = report.table().splitlines()
    assert lines[0].startswith("torchair check: converter-list check only (")
    assert lines[1].startswith(f"  checked: converter list of torch-npu {NPU}")
    assert "only real hardware shows: GE compiling and running the graph" in report.table()
    header = next(i for i, line in enumerate(lines) if line.startswith("severity"))
    assert lines[header].split() == ["severity", "rule", "node", "op", "message", "suggestion"]
    assert lines[header + 2].split()[:3] == ["error", "stub-converter", "roll"]
    assert lines[-1] == "1 error(s), 0 note(s) in what was checked above"
    data = json.loads(json.dumps(report.to_json()))
    assert data["ok"] is False and data["converters"] == f"torch-npu {NPU}" and data["toolchain_used"] is False
    assert data["scope"].startswith("converter-list check only") and len(data["checked"]) == 1
    assert (data["findings"][0]["severity"], data["findings"][0]["rule"], data["findings"][0]["node"]) == (
        "error", "stub-converter", "roll")
    assert data["ge_ops"] == [] and data["errors"] == 1 and data["notes"] == 0


def test_rules_cover_the_toolchains_findings():
    assert set(ascend_toolchain.RULES) <= set(RULES)
    with pytest.raises(ValueError, match="unknown severity 'warning'"):
        type(converter_list(trace(torch.roll, (torch.randn(3), 1))).findings[0])(
            "stub-converter", "n", "op", "m", "s", severity="warning")


# ---- the wheel's checks --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def toolchain():
    from wheels import torch_npu_wheel

    ensure_npu_ops()
    ensure_air_ops()
    return ascend_toolchain.load(torch_npu_wheel())


@pytest.fixture(scope="module")
def v3_bucket_graph(toolchain):
    """What torchair is handed for DeepSeek-V3's decode at batch 1, 16 heads per rank (TP 8)."""
    config = MLAConfig.preset("deepseek-v3")
    layer = MLAAttention(config, dtype=torch.bfloat16, tp_size=8).requires_grad_(False)
    lowered = lower(layer, "torchair", ["decode"], block_size=128,
                    target_options={"graph_batch_sizes": [1], "max_blocks_per_req": 4})
    cache = PagedLatentCache.allocate(config, 2, 128, dtype=torch.bfloat16)
    [gm] = lowered.runners["decode"].warmup(cache, layer.cos_sin)
    return gm


def _fia_node(gm):
    [node] = [n for n in gm.graph.nodes if str(n.target) in (FIA_AIR, "npu.npu_fused_infer_attention_score.default")]
    return node


def test_v3_decode_bucket_graph_converts_with_torchairs_own_converters(v3_bucket_graph):
    gm = v3_bucket_graph
    report = check_torchair(gm, toolchain=True)
    assert report.toolchain_used and report.errors() == [], report.table()
    for statement in WHEEL_CHECKS:
        assert any(c.startswith(statement) for c in report.checked), (statement, report.checked)
    assert report.not_checked == []
    types = report.ge_op_types()
    assert "MlaPrologV3" in types and "FusedInferAttentionScore" in types
    fia, prolog = _fia_node(gm), _call_nodes(gm, "npu.npu_mla_prolog_v3_functional")[0]
    [ge_fia] = [op for op in report.ge_ops if op.type == "FusedInferAttentionScore"]
    assert ge_fia.fx_node == fia.name and "actual_seq_lengths_kv: DT_INT64" in ge_fia.inputs
    assert [op.fx_node for op in report.ge_ops if op.type == "MlaPrologV3"] == [prolog]
    assert 'op: "MlaPrologV3"' in report.pbtxt and 'op: "FusedInferAttentionScore"' in report.pbtxt
    table = report.table()
    assert "converter-list check only" not in table and f"checked with the torch-npu {NPU} wheel" in table
    assert "GE ops: " in table and "MlaPrologV3" in table.split("GE ops: ")[1].splitlines()[0]


def test_head_count_per_rank_outside_the_documented_limit_is_a_note_with_the_reason(v3_bucket_graph):
    gm = v3_bucket_graph
    heads = MLAConfig.preset("deepseek-v3").num_heads // 8
    fia = _fia_node(gm)
    assert fia.kwargs["num_heads"] == heads == 16 and heads not in limits.MLA_HEADS
    report = check_torchair(gm, toolchain=True)
    [note] = [f for f in report.findings if f.rule == "kernel-limit"]
    assert (note.severity, note.node, note.op) == ("note", fia.name, FIA_AIR)
    assert "num_heads=16" in note.message and limits.MLA_HEADS_ADVISORY in note.message
    assert report.ok and json.loads(json.dumps(report.to_json()))["notes"] == len(report.notes()) >= 1


FIA_GRAPH = """
import torch
from torch.fx.experimental.proxy_tensor import make_fx

B, N, BLOCKS, BLOCK = 2, 32, 4, 128   # MLA decode through torchair's FIA: 32 heads over one latent head


def _attend(query, cache, query_rope, key_rope, block_table, seq_lens):
    out, _ = torch.ops.air.npu_fused_infer_attention_score(
        query, cache, cache, query_rope=query_rope, key_rope=key_rope, block_table=block_table,
        actual_seq_lengths_kv=seq_lens, num_heads=N, num_key_value_heads=1, input_layout="BNSD",
        block_size=BLOCK, scale=0.07)
    return (out,)


def build_graph():   # `mla-graph check` registers the npu:: and air:: ops first
    inputs = (torch.randn(B, N, 1, 512).bfloat16(), torch.randn(BLOCKS, 1, BLOCK, 512).bfloat16(),
              torch.randn(B, N, 1, 64).bfloat16(), torch.randn(BLOCKS, 1, BLOCK, 64).bfloat16(),
              torch.tensor([[1, 2], [3, 0]], dtype=torch.int32), torch.tensor([200, 37], dtype=torch.{lengths}))
    return make_fx(_attend, tracing_mode="fake")(*inputs)
"""


def _fia_graph(lengths: str):
    namespace = {}
    exec(FIA_GRAPH.format(lengths=lengths), namespace)
    return namespace["build_graph"]()


def test_int32_fia_lengths_are_a_ge_dtype_error_the_converter_list_cannot_see(toolchain):
    gm = _fia_graph("int32")
    report = check_torchair(gm, toolchain=True)
    [error] = report.errors()
    assert (error.rule, error.node, error.op) == ("ge-dtype", _fia_node(gm).name, "FusedInferAttentionScore")
    assert "actual_seq_lengths_kv is DT_INT32" in error.message and "DT_INT64" in error.message
    assert "torch.int64" in error.suggestion
    only_list = converter_list(gm)
    assert only_list.ok and only_list.table().startswith("torchair check: converter-list check only")
    clean = check_torchair(_fia_graph("int64"), toolchain=True)
    assert clean.findings == [] and "FusedInferAttentionScore" in clean.ge_op_types()   # 32 heads: no note


def test_toolchain_adds_nothing_to_nodes_the_converter_list_rejects(toolchain):
    def write(cache, idx, v):
        cache = cache.clone()
        cache[idx] = v
        return cache

    graphs = [(trace(write, (torch.zeros(8, 4), torch.tensor([1, 5]), torch.ones(2, 4))), "index-put"),
              (trace(lambda x: torch.roll(x, 1, 0) + 1, (torch.randn(4, 6),)), "stub-converter")]
    for gm, rule in graphs:
        report = check_torchair(gm, toolchain=True)
        [finding] = report.findings
        assert (finding.rule, finding.severity) == (rule, "error")
        # torchair could not convert that node either: a stand-in took its place in the GE graph
        assert [op.fx_node for op in report.ge_ops if op.stand_in] == [finding.node]


def test_a_symbolic_graph_is_not_converted_and_the_report_says_so(toolchain, npu_layer):
    gm = lower(npu_layer, "npu", ["decode"], block_size=128).graph_for("decode")
    report = check_torchair(gm, static_dims=False, toolchain=True)
    assert [f.op for f in report.errors()] == ["npu.npu_kv_rmsnorm_rope_cache_v2.default"]
    [skipped] = [f for f in report.notes() if f.rule == "ge-not-run"]
    assert skipped.node == "hidden_states" and "needs static shapes (a bucket graph)" in skipped.message
    assert report.ge_ops == [] and report.pbtxt is None
    assert not any(c.startswith("GE conversion") for c in report.checked)
    assert [c.split(" (")[0] for c in report.not_checked] == ["GE conversion and GE input dtypes"]
    assert any(c.startswith(WHEEL_CHECKS[2]) for c in report.checked)   # meta and limits need no static shapes
    [limit] = [f for f in report.findings if f.rule == "kernel-limit"]
    assert (limit.node, limit.severity) == (_fia_node(gm).name, "note") and "num_heads=8" in limit.message


def test_a_hard_kernel_limit_on_a_hand_built_node_is_an_error(toolchain):
    """Fake values not from our kernel (here: written by hand) can break a hard limit: an error."""
    graph = torch.fx.Graph()
    shapes = {"query": (2, 32, 1, 256), "cache": (4, 1, 128, 256), "query_rope": (2, 32, 1, 64),
              "key_rope": (4, 1, 128, 64)}
    nodes = {}
    for name, shape in shapes.items():
        nodes[name] = graph.placeholder(name)
        nodes[name].meta["val"] = torch.empty(shape, dtype=torch.bfloat16, device="meta")
    nodes["table"] = graph.placeholder("table")
    nodes["table"].meta["val"] = torch.zeros(2, 2, dtype=torch.int32, device="meta")
    fia = graph.call_function(torch.ops.npu.npu_fused_infer_attention_score.default,
                              (nodes["query"], nodes["cache"], nodes["cache"]),
                              dict(query_rope=nodes["query_rope"], key_rope=nodes["key_rope"],
                                   block_table=nodes["table"], actual_seq_lengths_kv=[200, 37], num_heads=32,
                                   num_key_value_heads=1, input_layout="BNSD", block_size=128))
    fia.meta["val"] = (torch.empty(2, 32, 1, 256, dtype=torch.bfloat16, device="meta"),
                       torch.empty(1, device="meta"))
    graph.output((fia,))
    report = check_torchair(torch.fx.GraphModule({}, graph), toolchain=True)
    [limit] = [f for f in report.findings if f.rule == "kernel-limit"]
    assert (limit.severity, limit.node) == ("error", fia.name) and "query D=256" in limit.message
    assert not report.ok


# ---- the CLI -------------------------------------------------------------------------------------

def test_cli_checks_a_config_json(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(V3_TINY.to_hf()))
    assert main(["check", str(config), "--target", "npu", "--block-size", "16", "--dtype", "fp32",
                 "--no-toolchain"]) == 1
    out = capsys.readouterr().out
    assert "/ npu / decode:" in out and "npu.npu_kv_rmsnorm_rope_cache_v2.default" in out
    assert "dynamic-dim" in out and "converter-list check only" in out
    assert main(["check", str(config), "--target", "npu", "--block-size", "16", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and data["checked"][0].startswith(f"converter list of torch-npu {NPU}")
    assert {f["rule"] for f in data["findings"] if f["severity"] == "error"} == {"dynamic-dim", "no-converter"}


BUILD_CLEAN = """
import torch
from mla_graph.testing import trace

def build_graph():
    return trace(lambda x, w: torch.nn.functional.linear(x, w).relu(), (torch.randn(4, 6), torch.randn(8, 6)))
"""
BUILD_INDEX_PUT = """
import torch
from mla_graph.testing import trace

def _write(cache, idx, v):
    cache = cache.clone()
    cache[idx] = v
    return cache

def build_graph():
    return trace(_write, (torch.zeros(8, 4), torch.tensor([1, 5]), torch.ones(2, 4)))
"""


def test_cli_checks_build_graph_files(tmp_path, capsys, toolchain):
    clean, bad = tmp_path / "clean.py", tmp_path / "bad.py"
    clean.write_text(BUILD_CLEAN)
    bad.write_text(BUILD_INDEX_PUT)
    assert main(["check", str(clean)]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("no errors, 0 note(s) in what was checked above") and "  checked: " in out
    assert "compatible" not in out and "clean" not in out.replace("clean.py", "")
    # torchair's AOT step decomposes linear before any converter sees it: not a finding, and said so
    assert "not checked: torchair's converters on linear (aten.linear.default): CompositeImplicitAutograd" in out
    assert main(["check", str(bad), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert [(f["rule"], f["node"]) for f in data["findings"]] == [("index-put", "index_put_")]


def test_cli_int32_fia_lengths_exit_1_and_no_toolchain_says_converter_list_only(tmp_path, capsys, toolchain):
    spec = tmp_path / "fia.py"
    spec.write_text(FIA_GRAPH.format(lengths="int32"))
    assert main(["check", str(spec)]) == 1
    out = capsys.readouterr().out
    row = next(line.split() for line in out.splitlines() if line.startswith("error "))
    assert row[:2] == ["error", "ge-dtype"] and "actual_seq_lengths_kv is DT_INT32" in out
    assert out.rstrip().endswith("1 error(s), 0 note(s) in what was checked above")
    assert main(["check", str(spec), "--no-toolchain"]) == 0      # the converter list cannot see dtypes
    out = capsys.readouterr().out
    assert "torchair check: converter-list check only (the wheel's checks were turned off" in out
    assert "GE conversion" not in out and "compatible" not in out
    assert main(["check", str(spec), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert [(f["severity"], f["rule"]) for f in data["findings"]] == [("error", "ge-dtype")]
    assert "FusedInferAttentionScore" in [op["type"] for op in data["ge_ops"]] and data["toolchain_used"]


def test_cli_checks_the_bucket_graph_of_a_preset(capsys, toolchain):
    assert main(["check", "deepseek-v3", "--tp-size", "8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["graph"] == "deepseek-v3 / torchair / decode" and data["errors"] == 0
    types = [op["type"] for op in data["ge_ops"]]
    assert "MlaPrologV3" in types and "FusedInferAttentionScore" in types
    [note] = [f for f in data["findings"] if f["rule"] == "kernel-limit"]
    assert note["severity"] == "note" and "num_heads=16" in note["message"]


NO_WHEEL = """
import sys

import torch

from mla_graph import ascend_toolchain
from mla_graph.cli import main
from mla_graph.torchair_compat import check_torchair
from mla_graph.testing import trace

print("exit", main(["check", sys.argv[1]]))
try:
    check_torchair(trace(torch.abs, (torch.ones(2),)), toolchain=True)
except ascend_toolchain.ToolchainUnavailable as error:
    print("raised", error)
"""


def test_without_the_wheel_the_check_says_converter_list_only(tmp_path):
    """A fresh process whose wheel cache is empty: what a host without the wheel sees."""
    spec = tmp_path / "fia.py"
    spec.write_text(FIA_GRAPH.format(lengths="int32"))
    env = {**os.environ, "MLA_GRAPH_CACHE": str(tmp_path / "empty")}
    done = subprocess.run([sys.executable, "-c", NO_WHEEL, str(spec)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert f"converter-list check only (no wheel: no torch-npu=={NPU} wheel in {tmp_path / 'empty'}" in out
    assert "exit 0" in out and "GE conversion" not in out and "compatible" not in out
    assert f"raised check_torchair(toolchain=True) needs the torch-npu {NPU} wheel's toolchain" in out


@pytest.mark.parametrize("source, message", [
    (None, "is not a preset"),
    ("x = 1\n", "defines no build_graph()"),
    ("def build_graph():\n    return 3\n", "returned int; expected a torch.fx.GraphModule"),
    ("def build_graph():\n    raise RuntimeError('boom')\n", "raised RuntimeError: boom"),
    ("import no_such_module_here\n", "failed to import: ModuleNotFoundError"),
])
def test_cli_bad_input_exits_2(tmp_path, capsys, source, message):
    spec = "gpt-2"
    if source is not None:
        spec = str(tmp_path / "graph.py")
        pathlib.Path(spec).write_text(source)
    assert main(["check", spec]) == 2
    assert message in capsys.readouterr().err


def test_cli_missing_files_exit_2(tmp_path, capsys):
    assert main(["check", str(tmp_path / "missing.py")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["check", str(tmp_path / "missing.json")]) == 2
    assert "Hugging Face config not found" in capsys.readouterr().err


# ---- tools/sync_ge_converters.py -----------------------------------------------------------------

def _sync_tool():
    spec = importlib.util.spec_from_file_location("sync_ge_converters", ROOT / "tools" / "sync_ge_converters.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CONVERTERS = '''
from torchair._ge_concrete_graph.ge_converter.converter_utils import *


@register_fx_node_ge_converter(torch.ops.aten.mm.default)
def conveter_mm(self, mat2, meta_outputs=None):
    return ge.MatMul(self, mat2)


@register_fx_node_ge_converter(torch.ops.aten.mm.out)
def conveter_mm_out(self, mat2, *, out=None, meta_outputs=None):
    """NB: aten::mm.out(...)"""
    raise NotImplementedError("torch.ops.aten.mm.out ge_converter is not implemented!")


@register_fx_node_ge_converter(getattr(torch.ops.aten.cat, "names", None))
def conveter_cat_names(tensors, dim, meta_outputs=None):
    raise RuntimeError("not supported")


@register_fx_node_ge_converter(torch.ops.npu.npu_rotary_mul.default)
def conveter_rotary_mul(x, r1, r2, rotary_mode="half", meta_outputs=None):
    if rotary_mode not in ("half", "interleave"):
        raise NotImplementedError("rotary_mode only support half/interleave now!")
    return ge.RotaryMul(x, r1, r2)


@register_fx_node_ge_converter(operator.add)
def conveter_add(self, other, meta_outputs=None):
    return self + other
'''


def _fake_wheel(root: pathlib.Path, version: str = "2.13.0") -> pathlib.Path:
    torchair = root / "torch_npu" / "dynamo" / "torchair"
    (torchair / "_ge_concrete_graph" / "ge_converter" / "aten").mkdir(parents=True)
    (torchair / "_ge_concrete_graph" / "ge_converter" / "aten" / "ops.py").write_text(CONVERTERS)
    (torchair / "_ge_concrete_graph" / "ge_converter" / "lite").mkdir()   # lite mode only: skipped
    (torchair / "_ge_concrete_graph" / "ge_converter" / "lite" / "q.py").write_text(
        "@register_fx_node_ge_converter(torch.ops.npu.npu_quant_matmul.default)\ndef f():\n    return 1\n")
    (torchair / "_contrib").mkdir()                                       # opt-in: skipped
    (torchair / "_contrib" / "c.py").write_text(
        "@register_fx_node_ge_converter(torch.ops.npu_inference.x.default)\ndef f():\n    return 1\n")
    (torchair / "scope").mkdir()
    (torchair / "scope" / "_wait_tensor.py").write_text(
        "@register_fx_node_ge_converter(torch.ops.air.wait_tensor.default)\ndef f(self, dep):\n    return self\n")
    (root / "torch_npu" / "version.py").write_text(f"__version__ = '{version}'\n")
    return root


def test_sync_tool_classifies_real_stub_and_partial(tmp_path, capsys):
    tool = _sync_tool()
    wheel, out = _fake_wheel(tmp_path / "wheel"), tmp_path / "ge_converters.txt"
    assert tool.main(["--wheel", str(wheel), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    table = parse_table(out.read_text())
    assert table.version == "2.13.0"
    assert table.kinds == {"aten.mm.default": "real", "aten.mm.out": "stub", "aten.cat.names": "stub",
                           "npu.npu_rotary_mul.default": "partial", "operator.add": "real",
                           "air.wait_tensor.default": "real"}
    assert "6 targets from 2 files (3 real, 1 partial, 2 stub)" in printed
    assert "added aten.mm.out (stub)" in printed

    # a new wheel (zipped this time) where mm.out became real and cat.names disappeared
    ops = wheel / "torch_npu/dynamo/torchair/_ge_concrete_graph/ge_converter/aten/ops.py"
    ops.write_text(CONVERTERS.replace('    raise NotImplementedError("torch.ops.aten.mm.out ge_converter is not '
                                      'implemented!")', "    return ge.MatMul(self, mat2)")
                   .replace('getattr(torch.ops.aten.cat, "names", None)', "torch.ops.aten.cat.default"))
    (wheel / "torch_npu" / "version.py").write_text("__version__ = '2.13.1'\n")
    whl = tmp_path / "torch_npu-2.13.1-cp311-cp311-linux.whl"
    with zipfile.ZipFile(whl, "w") as archive:
        for path in wheel.rglob("*.py"):
            archive.write(path, path.relative_to(wheel).as_posix())
    assert tool.main(["--wheel", str(whl), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "version 2.13.0 -> 2.13.1" in printed and "aten.mm.out: stub -> real" in printed
    assert "removed aten.cat.names (was stub)" in printed and "added aten.cat.default (stub)" in printed
    assert parse_table(out.read_text()).kinds["aten.mm.out"] == "real"


def test_sync_tool_rejects_a_folder_without_converters(tmp_path):
    with pytest.raises(SystemExit, match="no converter sources"):
        _sync_tool().main(["--wheel", str(tmp_path), "--out", str(tmp_path / "out.txt")])


def test_vendored_list_equals_the_real_wheel(tmp_path, capsys):
    """The same wheel the schema test uses (downloaded once, never imported)."""
    from wheels import torch_npu_wheel

    wheel = torch_npu_wheel()
    out = tmp_path / "ge_converters.txt"
    out.write_text((ROOT / "mla_graph" / "data" / f"ge_converters-{NPU}.txt").read_text())
    assert _sync_tool().main(["--wheel", str(wheel), "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[1] == "  no converter changed"
    assert parse_table(out.read_text()) == load_converters()

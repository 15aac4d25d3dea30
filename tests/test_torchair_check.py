"""check_torchair, `mla-graph check` and tools/sync_ge_converters.py.

Each rule gets a graph built to break it; the expected node names and ops are read off the
graph independently of the checker."""
import importlib.util
import json
import pathlib
import zipfile

import pytest
import torch
from conftest import V3_TINY, randomize
from torch.fx.experimental.proxy_tensor import make_fx

from mla_graph import MLAAttention, capture, lower
from mla_graph.cli import main
from mla_graph.npu import ensure_npu_ops
from mla_graph.torchair_compat import (AIR_SCHEMAS, check_torchair, ensure_air_ops, load_converters,
                                       parse_table)
from passes.testing import trace

ROOT = pathlib.Path(__file__).parent.parent


def _only(report, rule):
    found = [f for f in report.findings if f.rule == rule]
    assert found, report.table()
    return found


def _call_nodes(gm, prefix):
    return [n.name for n in gm.graph.nodes if n.op == "call_function" and str(n.target).startswith(prefix)]


# ---- the vendored data ---------------------------------------------------------------------------

def test_vendored_converter_list_knows_the_mla_kernels():
    table = load_converters()
    assert table.version == "2.13.0"
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
    report = check_torchair(gm)
    [finding] = report.findings
    assert (finding.rule, finding.node) == ("index-put", _call_nodes(gm, "aten.index_put")[0])
    assert "npu_scatter_nd_update_" in finding.suggestion and "scatter_update_" in finding.suggestion
    assert not report.ok


def test_stub_converter():
    gm = trace(lambda x: torch.roll(x, 1, 0) + 1, (torch.randn(4, 6),))
    [finding] = check_torchair(gm).findings
    assert (finding.rule, finding.node, finding.op) == ("stub-converter", _call_nodes(gm, "aten.roll")[0],
                                                        "aten.roll.default")
    assert "real GE converter" in finding.suggestion


def test_partial_converter():
    gm = trace(lambda w, i: torch.nn.functional.embedding(i, w), (torch.randn(10, 4), torch.tensor([1, 3])))
    [finding] = check_torchair(gm).findings
    assert (finding.rule, finding.op) == ("partial-converter", "aten.embedding.default")
    assert "2.13.0" in finding.suggestion


def test_no_converter_for_an_aten_op_outside_the_list():
    gm = trace(lambda x: torch.histc(x, bins=4), (torch.rand(16),))
    assert load_converters().kind("aten.histc.default") is None
    [finding] = check_torchair(gm).findings
    assert (finding.rule, finding.node, finding.op) == ("no-converter", "histc", "aten.histc.default")
    assert finding.message == "no GE converter registered in torchair" and "real GE converter" in finding.suggestion


def test_python_level_nodes():
    gm = torch.fx.symbolic_trace(lambda x: x.relu()[0])   # a call_method and operator.getitem
    [finding] = check_torchair(gm).findings
    assert (finding.rule, finding.node, finding.op) == ("no-converter", "relu", "Tensor.relu")
    assert "aten" in finding.suggestion


def test_composite_ops_are_judged_by_their_decomposition():
    clean = trace(lambda x, w: torch.nn.functional.linear(x, w), (torch.randn(4, 6), torch.randn(8, 6)))
    assert _call_nodes(clean, "aten.linear") and load_converters().kind("aten.linear.default") is None
    assert check_torchair(clean).ok    # t + mm, both with converters
    padded = trace(lambda x: torch.nn.functional.pad(x, (1, 1)), (torch.randn(4, 6),))
    [finding] = check_torchair(padded).findings
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
    report = check_torchair(torch.fx.GraphModule({}, g))
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
    report = check_torchair(torch.fx.GraphModule({}, g))
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
    assert check_torchair(gm).ok


def test_dynamic_dims_name_the_placeholder_and_dim():
    gm = make_fx(lambda x, w: x @ w, tracing_mode="symbolic")(torch.randn(5, 6), torch.randn(6, 7))
    report = check_torchair(gm)
    assert [(f.rule, f.op) for f in report.findings] == [("dynamic-dim", "placeholder")] * 2
    x_name, w_name = (n.name for n in gm.graph.nodes if n.op == "placeholder")
    assert [f.node for f in report.findings] == [x_name, w_name]
    assert "dim 0" in report.findings[0].message and "dim 1" in report.findings[0].message
    assert "bucket" in report.findings[0].suggestion
    assert check_torchair(gm, static_dims=False).ok


# ---- MLA graphs ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_layer():
    return randomize(MLAAttention(V3_TINY))


def test_captured_plain_graph_lists_every_mla_primitive(tiny_layer):
    gm = capture(tiny_layer, "decode", block_size=16)
    report = check_torchair(gm)
    primitives = _call_nodes(gm, "mla.")
    assert len(primitives) >= 5
    flagged = [f for f in report.findings if f.rule == "no-converter"]
    assert [f.node for f in flagged] == primitives
    assert all(f.suggestion == "lower it first (target npu/torchair)" for f in flagged)
    dynamic = {f.node: f.message for f in _only(report, "dynamic-dim")}
    assert "dim 0" in dynamic["hidden_states"]
    assert {f.rule for f in report.findings} == {"no-converter", "dynamic-dim"}


def test_npu_decode_graph_flags_only_the_in_place_cache_writer(tiny_layer):
    gm = lower(tiny_layer, "npu", ["decode"], block_size=16).graph_for("decode")
    report = check_torchair(gm, static_dims=False)
    [finding] = report.findings
    assert (finding.rule, finding.op) == ("no-converter", "npu.npu_kv_rmsnorm_rope_cache_v2.default")
    assert finding.node == _call_nodes(gm, "npu.npu_kv_rmsnorm_rope_cache_v2")[0]
    assert "npu.npu_kv_rmsnorm_rope_cache_v2_functional.default" in finding.suggestion
    assert _only(check_torchair(gm), "dynamic-dim")


def test_report_table_and_json():
    gm = trace(lambda x: torch.roll(x, 1, 0), (torch.randn(4, 6),))
    report = check_torchair(gm)
    table = report.table()
    assert table.splitlines()[0].split() == ["rule", "node", "op", "message", "suggestion"]
    assert "stub-converter  roll" in table and "1 finding(s)" in table
    data = json.loads(json.dumps(report.to_json()))
    assert data["ok"] is False and data["converters"] == "torch-npu 2.13.0"
    assert data["findings"][0]["rule"] == "stub-converter" and data["findings"][0]["node"] == "roll"


# ---- the CLI -------------------------------------------------------------------------------------

def test_cli_checks_a_config_json(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(V3_TINY.to_hf()))
    assert main(["check", str(config), "--target", "npu", "--block-size", "16", "--dtype", "fp32"]) == 1
    out = capsys.readouterr().out
    assert "/ npu / decode:" in out and "npu.npu_kv_rmsnorm_rope_cache_v2.default" in out
    assert "dynamic-dim" in out
    assert main(["check", str(config), "--target", "npu", "--block-size", "16", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and {f["rule"] for f in data["findings"]} == {"dynamic-dim", "no-converter"}


BUILD_CLEAN = """
import torch
from passes.testing import trace

def build_graph():
    return trace(lambda x, w: torch.nn.functional.linear(x, w).relu(), (torch.randn(4, 6), torch.randn(8, 6)))
"""
BUILD_INDEX_PUT = """
import torch
from passes.testing import trace

def _write(cache, idx, v):
    cache = cache.clone()
    cache[idx] = v
    return cache

def build_graph():
    return trace(_write, (torch.zeros(8, 4), torch.tensor([1, 5]), torch.ones(2, 4)))
"""


def test_cli_checks_build_graph_files(tmp_path, capsys):
    clean, bad = tmp_path / "clean.py", tmp_path / "bad.py"
    clean.write_text(BUILD_CLEAN)
    bad.write_text(BUILD_INDEX_PUT)
    assert main(["check", str(clean)]) == 0
    assert "clean" in capsys.readouterr().out
    assert main(["check", str(bad), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert [(f["rule"], f["node"]) for f in data["findings"]] == [("index-put", "index_put_")]


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
    out.write_text((ROOT / "mla_graph" / "data" / "ge_converters.txt").read_text())
    assert _sync_tool().main(["--wheel", str(wheel), "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[1] == "  no converter changed"
    assert parse_table(out.read_text()) == load_converters()

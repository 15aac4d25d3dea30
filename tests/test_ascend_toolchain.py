"""The real torchair converters and torch-npu meta functions, loaded from the wheel of the running torch's torch-npu release.

The oracle is the wheel itself: torchair's FX -> GE converters, the GE IR's registered dtype lists
and torch-npu's Python meta functions judge graphs built here with our emulated ops.
"""
import importlib.util

import pytest
import torch
from torch._guards import detect_fake_mode
from torch.fx.experimental.proxy_tensor import make_fx
from wheels import torch_npu_wheel

from mla_graph import ascend_toolchain as at
from mla_graph.ascend_toolchain.ge_registry import parse_ge_ops
from mla_graph.npu import ensure_npu_ops, npu_backend
from mla_graph.torchair_compat import ensure_air_ops
from mla_graph.stacks import torch_npu_release

# MLA decode through FIA: 32 heads over one latent KV head, D 512 + rope 64, paged cache of 128-row blocks.
B, N, BLOCKS, BLOCK, SCALE = 2, 32, 4, 128, 0.07


@pytest.fixture(scope="module")
def toolchain() -> at.Toolchain:
    ensure_npu_ops()
    ensure_air_ops()
    return at.load(torch_npu_wheel())


def _fia_inputs(lengths_dtype=torch.int64, table_dtype=torch.int32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, 1, 512, generator=gen).bfloat16()
    q_rope = torch.randn(B, N, 1, 64, generator=gen).bfloat16()
    cache = torch.randn(BLOCKS, 1, BLOCK, 512, generator=gen).bfloat16()       # BNSD view of the latent cache
    k_rope = torch.randn(BLOCKS, 1, BLOCK, 64, generator=gen).bfloat16()
    table = torch.tensor([[2, 0], [3, 1]], dtype=table_dtype)                 # 2 blocks per request
    lengths = torch.tensor([200, 37], dtype=lengths_dtype)
    return q, q_rope, cache, k_rope, table, lengths


def _air_fia(q, q_rope, cache, k_rope, table, lengths):
    out, _ = torch.ops.air.npu_fused_infer_attention_score(
        q, cache, cache, query_rope=q_rope, key_rope=k_rope, block_table=table, actual_seq_lengths_kv=lengths,
        num_heads=N, num_key_value_heads=1, input_layout="BNSD", block_size=BLOCK, sparse_mode=0, scale=SCALE)
    return (out,)


def _rms_norm_and_rope(x, gamma, q, cos, sin):
    y, rstd = torch.ops.npu.npu_rms_norm(x, gamma, 1e-6)
    return y, rstd, torch.ops.npu.npu_interleave_rope(q, cos, sin)


def _rope_inputs(dtype):
    return (torch.randn(2, 3, 64).to(dtype), torch.randn(64).to(dtype), torch.randn(2, 4, 1, 64).to(dtype),
            torch.randn(2, 1, 1, 64).to(dtype), torch.randn(2, 1, 1, 64).to(dtype))


def test_mm_relu_converts_without_findings(toolchain, tmp_path):
    gm = make_fx(lambda a, b: (torch.relu(a @ b),), tracing_mode="fake")(torch.randn(4, 8), torch.randn(8, 3))
    conversion = at.convert_to_ge(gm)
    assert conversion.complete and conversion.findings == []
    assert conversion.op_types() == ["Data", "Data", "MatMul", "Relu", "NetOutput"]
    matmul = next(op for op in conversion.ops if op.type == "MatMul")
    assert matmul.fx_node == "mm" and [i.dtype for i in matmul.inputs] == ["DT_FLOAT", "DT_FLOAT"]
    assert 'op: "MatMul"' in conversion.write_pbtxt(tmp_path / "g.pbtxt").read_text()


@pytest.mark.parametrize("lengths_dtype, table_dtype, offending", [
    (torch.int64, torch.int32, None),
    (torch.int32, torch.int32, "actual_seq_lengths_kv"),     # the IR: DT_INT64 only
    (torch.int64, torch.int64, "block_table"),               # the IR: DT_INT32 only
])
def test_fia_input_dtypes_are_checked_against_the_ge_ir(toolchain, lengths_dtype, table_dtype, offending):
    gm = make_fx(_air_fia, tracing_mode="fake")(*_fia_inputs(lengths_dtype, table_dtype))
    conversion = at.convert_to_ge(gm)
    assert conversion.complete and "FusedInferAttentionScore" in conversion.op_types()
    fia_node = next(n.name for n in gm.graph.nodes if n.target == torch.ops.air.npu_fused_infer_attention_score.default)
    if offending is None:
        assert conversion.findings == []
    else:
        (finding,) = conversion.findings
        assert (finding.severity, finding.rule, finding.op, finding.node) == (
            "error", "ge-dtype", "FusedInferAttentionScore", fia_node)
        assert f"input {offending} is DT_INT" in finding.message
    assert at.compare_with_wheel_meta(gm) == []   # torchair's own meta for air FIA agrees with our fake


def test_npu_fia_with_host_lengths_converts_clean(toolchain):
    def npu_fia(q, q_rope, cache, k_rope, table):
        return (torch.ops.npu.npu_fused_infer_attention_score(
            q, cache, cache, query_rope=q_rope, key_rope=k_rope, block_table=table, actual_seq_lengths_kv=[200, 37],
            num_heads=N, num_key_value_heads=1, input_layout="BNSD", block_size=BLOCK, scale=SCALE)[0],)

    gm = make_fx(npu_fia, tracing_mode="fake")(*_fia_inputs()[:5])
    conversion = at.convert_to_ge(gm)
    assert conversion.findings == [] and "FusedInferAttentionScore" in conversion.op_types()
    assert at.compare_with_wheel_meta(gm) == []


def test_unconvertible_nodes_are_findings_and_conversion_goes_on(toolchain):
    def ring_then_mm(q_nope, q_rope, k_nope, k_rope, value, mask, seqlen, w, cond):
        out, _ = torch.ops.atb.npu_ring_mla(q_nope, q_rope, k_nope, k_rope, value, mask, seqlen, 4, 4,
                                            calc_type="calc_type_first_ring")
        return (out.flatten(1) @ w,)

    inputs = [torch.randn(4, 4, 16), torch.randn(4, 4, 8), torch.randn(4, 4, 16), torch.randn(4, 4, 8),
              torch.randn(4, 4, 16), torch.zeros(1), torch.tensor([4], dtype=torch.int32), torch.randn(64, 8),
              torch.ones(4, 8, dtype=torch.bool)]
    gm = make_fx(ring_then_mm, tracing_mode="fake")(*inputs)
    # aten.where.ScalarOther, as our torchair lowering emits it (make_fx would decompose it)
    output, cond = gm.graph.output_node(), list(gm.graph.find_nodes(op="placeholder"))[-1]
    with gm.graph.inserting_before(output):
        where = gm.graph.call_function(torch.ops.aten.where.ScalarOther, (cond, output.args[0][0], 0.0))
    output.args = ((where,),)
    conversion = at.convert_to_ge(gm)
    assert [(f.rule, f.node) for f in conversion.findings] == [("ge-no-converter", "npu_ring_mla"),
                                                               ("ge-convert-error", where.name)]
    assert "ScalarOther ge_converter is not supported" in conversion.findings[1].message
    # stand-ins took both nodes' places, so the matmul between them was still converted
    assert conversion.complete and "MatMul" in conversion.op_types()
    assert [op.type for op in conversion.ops if op.stand_in] == ["atb.npu_ring_mla.default",
                                                                 "aten.where.ScalarOther"]


def test_stream_scopes_label_ge_ops_and_wait_tensor_becomes_a_control_edge(toolchain):
    def two_streams(a, b, c):
        torch.ops.air.scope_enter(["_user_stream_label", "_user_stream_priority"], ["mla_secondary", "0"])
        side = a @ b
        torch.ops.air.scope_exit()
        return torch.ops.air.wait_tensor(c, side) @ b, side

    conversion = at.convert_to_ge(make_fx(two_streams, tracing_mode="fake")(*[torch.randn(8, 8)] * 3))
    assert conversion.findings == []
    labelled = [op.name for op in conversion.graph.graph._proto.op if "_user_stream_label" in op.attr]
    assert labelled == [op.name for op in conversion.ops if op.fx_node == "mm"] == ["MatMul"]
    identity = next(op for op in conversion.graph.graph._proto.op if op.type == "Identity")
    assert list(identity.input) == ["c_1:0", "MatMul:-1"]   # data from c, control edge from the side stream


def test_emulated_kernels_still_run_after_load(toolchain):
    assert importlib.util.find_spec("torch_npu") is None and npu_backend() == "emulated"
    q, q_rope, cache, k_rope, table, lengths = _fia_inputs(seed=1)
    (out,) = _air_fia(q, q_rope, cache, k_rope, table, lengths)   # torchair's CPU kernel would raise
    for b in range(B):   # textbook MLA attention over the sequence's paged rows
        rows = cache[table[b].long(), 0].reshape(-1, 512)[: lengths[b]].float()
        rope_rows = k_rope[table[b].long(), 0].reshape(-1, 64)[: lengths[b]].float()
        scores = (q[b, :, 0].float() @ rows.T + q_rope[b, :, 0].float() @ rope_rows.T) * SCALE
        expected = torch.softmax(scores, -1) @ rows
        torch.testing.assert_close(out[b, :, 0].float(), expected, rtol=2 ** -7, atol=2 ** -7)
    x = torch.randn(3)
    torch.testing.assert_close(torch.ops.air.wait_tensor(x, x), x)   # torchair's kernel raises
    torch.ops.air.scope_enter(["_user_stream_label"], ["s"])
    torch.ops.air.scope_exit()
    assert any(skipped.startswith("impl air::npu_fused_infer_attention_score") for skipped in toolchain.kept_out)


def test_interleave_rope_bf16_is_a_known_stale_note_fp32_an_error(toolchain):
    notes = at.convert_to_ge(make_fx(_rms_norm_and_rope, tracing_mode="fake")(*_rope_inputs(torch.bfloat16))).findings
    assert {(f.severity, f.op) for f in notes} == {("note", "InterleaveRope")} and len(notes) == 3
    errors = at.convert_to_ge(make_fx(_rms_norm_and_rope, tracing_mode="fake")(*_rope_inputs(torch.float32))).findings
    assert {(f.severity, f.op) for f in errors} == {("error", "InterleaveRope")} and len(errors) == 3


def test_wheel_meta_agrees_with_our_fakes_and_catches_a_planted_mismatch(toolchain):
    meta = at.wheel_meta("npu_rms_norm")
    assert meta.__code__.co_filename.endswith("op_plugin/meta/_meta_registrations.py")
    gm = make_fx(_rms_norm_and_rope, tracing_mode="fake")(*_rope_inputs(torch.bfloat16))
    assert at.compare_with_wheel_meta(gm) == []
    node = next(n for n in gm.graph.nodes if n.target == torch.ops.npu.npu_rms_norm.default)
    y, rstd = node.meta["val"]
    with detect_fake_mode([y]):
        node.meta["val"] = (y, torch.empty(2, 3, 64, dtype=torch.float32))   # rstd should be [2, 3, 1]
    (finding,) = at.compare_with_wheel_meta(gm)
    assert (finding.rule, finding.node) == ("meta-mismatch", node.name)
    assert "output 1: shape ['2', '3', '64']" in finding.message and "['2', '3', '1']" in finding.message


def test_wheel_meta_argument_checks_are_findings(toolchain):
    graph = torch.fx.Graph()
    values = {"kv": torch.empty(2, 1, 576), "gamma": torch.empty(512), "cos": torch.empty(2, 1, 1, 64),
              "sin": torch.empty(2, 1, 1, 64), "index": torch.zeros(2, dtype=torch.int64),
              "k_cache": torch.empty(4, 16, 1, 64), "ckv_cache": torch.empty(4, 16, 1, 512)}
    args = []
    for name, value in values.items():
        args.append(graph.placeholder(name))
        args[-1].meta["val"] = value.to("meta")
    node = graph.call_function(torch.ops.npu.npu_kv_rmsnorm_rope_cache.default, tuple(args))
    node.meta["val"] = tuple(torch.empty(1, device="meta") for _ in range(4))
    graph.output((node,))
    (finding,) = at.compare_with_wheel_meta(torch.fx.GraphModule(torch.nn.Module(), graph))
    assert (finding.rule, finding.severity) == ("meta-error", "error")
    assert "4D tensor expected for input kv" in finding.message   # kv is 3-D: the wheel's own check


def test_load_is_idempotent_and_status_names_the_wheel(toolchain, tmp_path):
    assert at.load() is toolchain and at.available()
    assert str(toolchain.wheel) in at.status() and f"torch-npu {torch_npu_release()} wheel" in at.status()
    assert toolchain.npu_schemas_failed == {} and toolchain.converter_import_failures == []
    with pytest.raises(ValueError, match="already loaded"):
        at.load(tmp_path / "other.whl")


def test_ge_registry_reads_named_classes_symbols_and_dynamic_inputs():
    types_h = ("enum DataType {\n DT_FLOAT = ::C_DT_FLOAT,\n DT_INT32 = ::C_DT_INT32,\n DT_INT64 = ::C_DT_INT64,\n"
               " DT_BF16 = ::C_DT_BF16,\n DT_MAX = ::C_DT_MAX,\n};\n"
               "static TensorType IndexNumberType() { return TensorType{DT_INT32, DT_INT64}; }\n")
    raw_ops = ('"""REG_OP(Toy)\\n\n    .INPUT(x, "T")\\n\n    .DYNAMIC_INPUT(key, TensorType({DT_BF16}))\\n\n'
               '    .OPTIONAL_INPUT(idx, TensorType::IndexNumberType())\\n\n'
               '    .OPTIONAL_INPUT(odd, TensorType({DT_FLOAT32, DI_INT8}))\\n\n'
               '    .DATATYPE(T, TensorType({DT_FLOAT32, DT_BFLOAT16}))\\n\n    """')
    toy = parse_ge_ops(raw_ops, types_h)["Toy"]
    assert toy["x"].dtypes == {"DT_FLOAT", "DT_BF16"}              # "T" through .DATATYPE, aliases resolved
    assert toy["idx"].dtypes == {"DT_INT32", "DT_INT64"}
    assert toy["key"].kind == "DYNAMIC_INPUT" and toy["odd"].dtypes is None   # a typo: accept any dtype

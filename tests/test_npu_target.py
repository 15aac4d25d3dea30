"""Target "npu": equals the reference target through the emulated torch_npu kernels."""
import pytest
import torch
from conftest import TOL, V3_TINY, randomize

from mla_graph import MLAAttention, PagedLatentCache, build_metadata, lower, positions_for
from mla_graph.checking import compare_with_plain
from mla_graph.npu import EMULATED_SCHEMAS, npu_backend
from passes import PassManager, PassResult, PassVerificationError


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("phase", ["prefill", "decode", "mixed"])
def test_npu_equals_reference(config, dtype, phase):
    layer = randomize(MLAAttention(config, dtype=dtype))
    npu = lower(layer, "npu", [phase], block_size=16)
    result = compare_with_plain(layer, npu, phase, seed=7)
    assert result.ok, result


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_several_decode_steps_and_cache_contents(config, dtype):
    """Prefill then 5 decode steps: npu and reference agree on every output and, after the last
    step, on the whole contents of both caches."""
    block_size = 16
    layer = randomize(MLAAttention(config, dtype=dtype))
    ref = lower(layer, "reference", block_size=block_size)
    npu = lower(layer, "npu", block_size=block_size)
    caches = {name: PagedLatentCache.allocate(config, 24, block_size, dtype=dtype, shuffle_blocks=True, seed=1)
              for name in ("ref", "npu")}
    rows = [[], [], []]
    prompts = [3, 18, 30]
    gen = torch.Generator().manual_seed(3)
    rtol, atol = TOL[dtype]
    for step in range(6):
        requests = [(p, 0) for p in prompts] if step == 0 else [(1, p + step - 1) for p in prompts]
        for row, (n, c) in zip(rows, requests):
            caches["ref"].allocator.grow(row, n + c, block_size)
        md = build_metadata(requests, rows, block_size)
        x = torch.randn(md.num_tokens, config.hidden_size, generator=gen).to(dtype)
        pos = positions_for(requests)
        out_ref = ref(x, pos, caches["ref"], md)
        out_npu = npu(x, pos, caches["npu"], md)
        # twice the layer tolerance: npu_rms_norm / the fused cache writer round after the gamma
        # multiply, the reference before it, so cached rows may differ by a bf16 ulp and the
        # difference carries through later steps (2 ulps at outputs of magnitude 4-8 is 0.0625)
        torch.testing.assert_close(out_npu, out_ref, rtol=rtol, atol=atol * 2)
    for part in ("latent", "rope"):
        torch.testing.assert_close(getattr(caches["npu"], part), getattr(caches["ref"], part), rtol=rtol, atol=atol)


def test_decode_graph_is_fully_lowered_with_folded_weights():
    layer = randomize(MLAAttention(V3_TINY))
    gm = lower(layer, "npu", ["decode"], block_size=16).graph_for("decode")
    ops = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert not [op for op in ops if op.startswith("mla.")]
    assert {"npu.npu_fused_infer_attention_score.default", "npu.npu_kv_rmsnorm_rope_cache_v2.default",
            "npu.npu_interleave_rope.default", "npu.npu_rms_norm.default"} <= ops
    # no per-call weight transform: kv_b_proj's weight is not read at all (its absorbed halves are
    # constants folded at lowering), and every bmm reads a constant as its second operand
    readers = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == "kv_b_proj.weight"]
    assert readers == [] or all(not r.users for r in readers)
    for node in gm.graph.nodes:
        if node.target is torch.ops.aten.bmm.default:
            assert node.args[1].op == "get_attr"
    fia = next(n for n in gm.graph.nodes if n.target is torch.ops.npu.npu_fused_infer_attention_score.default)
    assert fia.kwargs["input_layout"] == "BNSD" and fia.kwargs["num_key_value_heads"] == 1


def test_verifier_checks_emitted_vendor_ops_against_their_schema():
    layer = MLAAttention(V3_TINY)
    gm = lower(layer, "npu", ["decode"], block_size=16).graph_for("decode")

    def bad_layout(gm):
        fia = next(n for n in gm.graph.nodes if n.target is torch.ops.npu.npu_fused_infer_attention_score.default)
        fia.kwargs = {**fia.kwargs, "input_layout": "BSXD"}
        return PassResult(changed=True, matches=1)

    with pytest.raises(PassVerificationError, match="'bad_layout'.*input_layout"):
        PassManager([bad_layout]).run(gm)

    def unknown_kwarg(gm):
        node = next(n for n in gm.graph.nodes if n.target is torch.ops.npu.npu_rms_norm.default)
        node.kwargs = {"eps": 1e-6}
        return PassResult(changed=True)

    fresh = lower(layer, "npu", ["decode"], block_size=16).graph_for("decode")
    with pytest.raises(PassVerificationError, match="'unknown_kwarg'.*npu.npu_rms_norm.default fails"):
        PassManager([unknown_kwarg]).run(fresh)


def test_emitted_ops_use_the_torch_npu_schemas():
    layer = MLAAttention(V3_TINY)
    lowered = lower(layer, "npu", block_size=16)
    for gm in lowered.graphs.values():
        for node in gm.graph.nodes:
            name = str(node.target) if node.op == "call_function" else ""
            if name.startswith(("npu.", "atb.")):
                ns, op = name.split(".")[:2]
                assert f"{ns}::{op}" in EMULATED_SCHEMAS
                if npu_backend() == "emulated":
                    assert str(node.target._schema).startswith(f"{ns}::{op}(")


def test_cli_lower_npu(capsys):
    from mla_graph.cli import main
    import json, tempfile, pathlib
    with tempfile.TemporaryDirectory() as tmp:
        cfg = pathlib.Path(tmp) / "config.json"
        cfg.write_text(json.dumps(V3_TINY.to_hf()))
        assert main(["lower", "--hf-config", str(cfg), "--target", "npu", "--block-size", "16",
                     "--dtype", "fp32", "--dump", str(pathlib.Path(tmp) / "d"), "--verify"]) == 0
        out = capsys.readouterr().out
        assert "absorb_kv_weights" in out and "npu.npu_fused_infer_attention_score.default" in out
        assert "MISMATCH" not in out
        assert (pathlib.Path(tmp) / "d" / "decode" / "04-page_latent_attention.after.txt").exists()

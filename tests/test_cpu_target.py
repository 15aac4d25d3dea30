"""The `cpu` target: the absorbed / paged forms the cost model picks, latent attention on the cpu
kernel (mla_cpu::paged_attention), checked against the plain definition like every target."""
from __future__ import annotations

import pytest
import torch

from torch.testing import FileCheck

from conftest import CONFIGS, randomize
from mla_graph.contract import graph_meta
from mla_graph import MLAAttention, lower
from mla_graph.checking import compare_with_plain


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_phase_agrees_with_the_definition(name, dtype):
    layer = randomize(MLAAttention(CONFIGS[name], dtype=dtype))
    lowered = lower(layer, "cpu", block_size=16)
    for phase in ("decode", "prefill", "mixed"):
        for seed in (0, 1):
            agreement = compare_with_plain(layer, lowered, phase, seed=seed)
            assert agreement.ok, (phase, seed, agreement)


def test_decode_is_absorbed_and_paged():
    """Decode attends over the latent in place with the cpu kernel: no kv_b_proj decompression of the
    context, no gather of whole block-table rows, no reference paged_attention left; W_UK / W_UV are
    folded once at lowering."""
    layer = randomize(MLAAttention(CONFIGS["v3"]))
    gm = lower(layer, "cpu", ["decode"], block_size=16).graphs["decode"]
    FileCheck().check_count("torch.ops.mla_cpu.paged_attention.default", 1, exactly=True).run(gm.code)
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count("mla_cpu.paged_attention.default") == 1, targets
    assert not any("gather_paged" in t or t in ("mla.attention.default", "mla.paged_attention.default")
                   for t in targets), targets
    assert graph_meta(gm).attention_form == "absorbed"
    assert graph_meta(gm).derived_constants, "absorbed W_UK / W_UV are recut when the weights change"


def test_a_mixed_batch_runs_each_part_in_its_own_form():
    """A mixed batch is split where the decodes end: the decodes attend in the absorbed form on the
    cpu kernel, the prefill chunks over decompressed K/V on the dense one (the form the cost model picks for long
    prompts). One form for every token made a mixed step of long prompts cost as much again as the
    prompts alone (the absorbed form's scores are L+R = 576 wide per pair, not P+R)."""
    layer = randomize(MLAAttention(CONFIGS["v3"]))
    gm = lower(layer, "cpu", ["mixed"], block_size=16).graphs["mixed"]
    attention = {"mla_cpu.paged_attention.default": 6, "mla_cpu.attention.default": 4}   # where seq_lens is
    parts = {n.args[attention[str(n.target)]].name: str(n.target) for n in gm.graph.nodes
             if n.op == "call_function" and str(n.target) in attention}
    assert parts == {"decode_seq_lens": "mla_cpu.paged_attention.default",
                     "prefill_seq_lens": "mla_cpu.attention.default"}
    assert {n.name for n in gm.graph.nodes if n.op == "placeholder"} >= {
        f"{part}_{name}" for part in ("decode", "prefill") for name in ("block_table", "seq_lens", "query_start_loc")}


def test_each_call_runs_the_form_its_own_batch_prefers():
    """Prefill and mixed have a graph in each form; a call of long fresh prompts runs the decompressed
    one, a few new tokens over a long cached context (a prefill chunk, or a verification step of
    assisted generation) the absorbed one (its decompressed form would run kv_b_proj over the whole
    context: ~4x the time at these sizes). Both agree with the plain definition."""
    from mla_graph.checking import LAYER_TOLERANCES, random_batch
    from mla_graph.config import MLAConfig

    config = MLAConfig(hidden_size=256, num_heads=8, q_lora_rank=64, kv_lora_rank=128, qk_nope_head_dim=32,
                       qk_rope_head_dim=32, v_head_dim=32, max_position_embeddings=4096)
    layer = randomize(MLAAttention(config))
    lowered = lower(layer, "cpu", block_size=16)
    assert lowered.phases == ["prefill", "decode", "mixed"]
    assert set(lowered.graphs) == {"prefill", "prefill:absorbed", "decode", "mixed", "mixed:absorbed"}
    assert graph_meta(lowered.graphs["prefill"]).attention_form == "decompressed"
    assert graph_meta(lowered.graphs["prefill:absorbed"]).forced_attention_form == "absorbed"
    rtol, atol = LAYER_TOLERANCES[torch.float32]
    for requests, phase, form in (([(300, 0), (200, 0)], "prefill", "decompressed"),
                                  ([(3, 1500), (2, 900)], "prefill", "absorbed"),
                                  ([(1, 40), (4, 1500)], "mixed", "absorbed"),
                                  ([(1, 40), (300, 0)], "mixed", "decompressed")):
        batch = random_batch(layer, requests, block_size=16, seed=len(requests))
        assert batch.metadata.phase == phase
        want_cache, got_cache = batch.cache.clone(), batch.cache.clone()
        lowered.form_choices.clear()
        with torch.no_grad():
            want = layer(batch.hidden_states, batch.positions, want_cache, batch.metadata)
            got = lowered(batch.hidden_states, batch.positions, got_cache, batch.metadata)
        assert dict(lowered.form_choices) == {(phase, form): 1}, (requests, lowered.form_choices)
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{requests}: {m}")
        torch.testing.assert_close(got_cache.latent, want_cache.latent, rtol=rtol, atol=atol)

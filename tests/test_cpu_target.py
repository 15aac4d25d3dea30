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

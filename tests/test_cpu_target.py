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

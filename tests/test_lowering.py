"""lower(): same call signature, equal numerics, and the user's module is never touched."""
import os

import pytest
import torch
from conftest import V3_NPU, V3_TINY, randomize

from mla_graph import MLAAttention, LoweringError, lower
from mla_graph.checking import compare_with_plain, random_batch
from mla_graph.targets import TARGETS
from mla_graph.passes import PassResult


@pytest.mark.parametrize("phase", ["prefill", "decode", "mixed"])
def test_reference_target_equals_plain(config, phase):
    layer = randomize(MLAAttention(config))
    lowered = lower(layer, "reference", [phase], block_size=16)
    result = compare_with_plain(layer, lowered, phase)
    assert result.ok, result


def test_phase_dispatch_and_missing_phase():
    layer = randomize(MLAAttention(V3_TINY))
    lowered = lower(layer, phases=["decode"], block_size=16)
    batch = random_batch(layer, [(5, 0)], block_size=16)
    with pytest.raises(LoweringError, match="this batch is a prefill batch but only \\['decode'\\] were lowered"):
        lowered(batch.hidden_states, batch.positions, batch.cache, batch.metadata)
    with pytest.raises(ValueError, match="lowered for block_size 16; lower again with block_size=128"):
        other = random_batch(layer, [(1, 3)], block_size=128)
        lowered(other.hidden_states, other.positions, other.cache, other.metadata)


def test_bad_target_and_phase():
    layer = MLAAttention(V3_TINY)
    with pytest.raises(ValueError, match="unknown target 'gpu'; expected one of reference"):
        lower(layer, "gpu")
    with pytest.raises(ValueError, match="unknown phase"):
        lower(layer, phases=["decoding"])


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}, [id(p) for p in module.parameters()]


def test_lowering_never_mutates_the_layer():
    layer = randomize(MLAAttention(V3_TINY))
    state, ids = _snapshot(layer)
    lower(layer, block_size=16)
    after, after_ids = _snapshot(layer)
    assert ids == after_ids and all(torch.equal(state[k], after[k]) for k in state)


def test_failed_lowering_leaves_layer_untouched(monkeypatch):
    def scribble_then_fail(gm):
        # a pass that corrupts a weight it was handed and then crashes
        gm.kv_b_proj.weight = torch.nn.Parameter(torch.zeros_like(gm.kv_b_proj.weight))
        raise RuntimeError("pass crashed")

    monkeypatch.setitem(TARGETS, "broken", TARGETS["reference"].extended({"tidy": [scribble_then_fail]}, name="broken"))
    layer = randomize(MLAAttention(V3_TINY))
    state, ids = _snapshot(layer)
    with pytest.raises(RuntimeError, match="pass crashed"):
        lower(layer, "broken", block_size=16)
    after, after_ids = _snapshot(layer)
    assert ids == after_ids and all(torch.equal(state[k], after[k]) for k in state)


def test_dump_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MLA_GRAPH_DUMP", str(tmp_path))
    lower(MLAAttention(V3_TINY), phases=["decode"], block_size=16)
    assert sorted(os.listdir(tmp_path / "decode")) == ["00-capture.txt", "summary.json"]


def test_pass_writing_a_weight_in_place_is_named(monkeypatch):
    from mla_graph.passes import PassVerificationError

    def scales_weight(gm):
        gm.o_proj.weight.mul_(2)
        return PassResult(changed=False)

    monkeypatch.setitem(TARGETS, "inplace", TARGETS["reference"].extended({"tidy": [scales_weight]}, name="inplace"))
    with pytest.raises(PassVerificationError, match="'scales_weight': wrote to weight 'o_proj.weight' in place"):
        lower(MLAAttention(V3_TINY).requires_grad_(False), "inplace", phases=["decode"], block_size=16)


def test_html_report_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MLA_GRAPH_DUMP", str(tmp_path))
    monkeypatch.setenv("MLA_GRAPH_DUMP_FORMAT", "txt,html")
    lower(MLAAttention(V3_TINY), "npu", phases=["decode"], block_size=16)
    html = (tmp_path / "report.html").read_text()
    assert "absorb_kv_weights" in html and "http://" not in html and "https://" not in html


@pytest.mark.parametrize("target", ["npu", "torchair"])
def test_weights_written_after_lowering_reach_the_derived_weights(target):
    """A weight reload in place (as vLLM does) recuts W_UK/W_UV (and the prolog's weights) before
    the next call: decode (absorbed) and prefill (decompressed) keep agreeing with the layer. V3_NPU:
    the dims the fused prolog (torchair) and FIA TND prefill admit, so their derived weights exist."""
    layer = randomize(MLAAttention(V3_NPU, dtype=torch.bfloat16), std=0.02)
    lowered = lower(layer, target, ["decode", "prefill"], block_size=16)
    with torch.no_grad():
        layer.kv_b_proj.weight.mul_(1.5)
        layer.q_b_proj.weight.mul_(0.5)
    for phase in ("decode", "prefill"):
        assert compare_with_plain(layer, lowered, phase).ok, phase
    assert lowered.refresh_derived() == 0   # the forward already refreshed them


@pytest.mark.parametrize("target", ["npu", "torchair"])
def test_data_writes_reach_the_derived_weights_when_forced(target):
    """`param.data.copy_` (vLLM's default_weight_loader) leaves autograd's version counter as it
    was: outside checked mode the per-call check recuts nothing, refresh_derived(force=True) recuts
    every derived weight."""
    layer = randomize(MLAAttention(V3_NPU, dtype=torch.bfloat16), std=0.02)
    lowered = lower(layer, target, ["decode"], block_size=16, checked=False)
    layer.kv_b_proj.weight.data.copy_(layer.kv_b_proj.weight * 1.5)
    layer.q_b_proj.weight.data.copy_(layer.q_b_proj.weight * 0.5)
    assert lowered.refresh_derived() == 0
    assert not compare_with_plain(layer, lowered, "decode").ok   # stale until forced
    assert lowered.refresh_derived(force=True) == len(lowered._derived) > 0
    assert compare_with_plain(layer, lowered, "decode").ok
    assert lowered.refresh_derived() == 0


@pytest.mark.parametrize("target", ["npu", "torchair"])
def test_data_writes_reach_the_derived_weights_in_checked_mode(target):
    """Checked mode compares the sources' fingerprints on every call: `.data` writes are followed
    without anyone calling refresh_derived."""
    layer = randomize(MLAAttention(V3_NPU, dtype=torch.bfloat16), std=0.02)
    lowered = lower(layer, target, ["decode"], block_size=16, checked=True)
    assert compare_with_plain(layer, lowered, "decode").ok
    layer.kv_b_proj.weight.data.copy_(layer.kv_b_proj.weight * 1.5)
    layer.q_b_proj.weight.data[0, 0] += 0.25   # one element is enough
    assert compare_with_plain(layer, lowered, "decode").ok
    assert lowered.refresh_derived(by_value=True) == 0   # the call already recut them

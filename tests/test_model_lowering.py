"""lower_layers: each layer shape is lowered once, further layers re-bound to their own weights."""
import pytest
import torch
from conftest import randomize

import mla_graph.lowering as lowering_module
import mla_graph.model_lowering as model_lowering
from mla_graph.contract import graph_meta
from mla_graph import MLAAttention, MLAConfig, lower
from mla_graph.checking import PHASE_BATCHES, compare_with_plain, random_batch
from mla_graph.model_lowering import LayerLowering, lower_layers, rebind

TINY = MLAConfig.preset("deepseek-v2-lite").replace(
    hidden_size=64, num_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
BLOCK = 16


def make_layers(count, config=TINY, seed=0, dtype=torch.float32):
    """Layers with weights of their own, norm gammas included (1 + noise): a graph re-bound to
    another layer's gamma, or to the template's, computes something else."""
    std = 0.2 if dtype == torch.float32 else 0.1   # bf16: smaller logits, noise within the layer tolerance
    return [randomize(MLAAttention(config, dtype=dtype), seed=100 * seed + i, std=std) for i in range(count)]


@pytest.fixture
def captures(monkeypatch):
    """Counts calls of capture made by lower()."""
    calls = []
    real = lowering_module.capture

    def counting(layer, phase, **kwargs):
        calls.append(phase)
        return real(layer, phase, **kwargs)

    monkeypatch.setattr(lowering_module, "capture", counting)
    return calls


def test_three_layers_lowered_once_equal_separate_lowering(captures):
    layers = make_layers(3)
    summary = []
    lowered = lower_layers(layers, "npu", ["decode"], block_size=BLOCK, summary=summary)
    assert captures == ["decode"]
    assert [(g.layers, g.reused) for g in summary] == [([0, 1, 2], True)]
    for i, (layer, low) in enumerate(zip(layers, lowered)):
        assert compare_with_plain(layer, low, "decode", seed=i).ok
        alone = lower(layer, "npu", ["decode"], block_size=BLOCK)
        batch = random_batch(layer, PHASE_BATCHES["decode"], block_size=BLOCK, seed=i)
        a, b = batch.cache.clone(), batch.cache.clone()
        torch.testing.assert_close(low(batch.hidden_states, batch.positions, a, batch.metadata),
                                   alone(batch.hidden_states, batch.positions, b, batch.metadata),
                                   rtol=0, atol=0)


def test_rebound_graphs_read_the_layers_own_weights_and_recut_derived_ones():
    layers = make_layers(2)
    _, second = lower_layers(layers, "npu", ["decode"], block_size=BLOCK)
    gm = second.graphs["decode"]
    own = dict(layers[1].named_parameters())
    read = [n.target for n in gm.graph.nodes if n.op == "get_attr" and n.target in own]
    assert "kv_b_proj.weight" not in read and "o_proj.weight" in read   # kv_b_proj is folded away
    for target in read:
        assert gm.get_parameter(target) is own[target], target   # the layer's tensor, not a copy
    P, V, N = TINY.qk_nope_head_dim, TINY.v_head_dim, TINY.num_heads
    w = layers[1].kv_b_proj.weight.view(N, P + V, TINY.kv_lora_rank)
    derived = graph_meta(gm).derived_constants
    (uk,) = [t for t in derived if t.endswith("_w_uk")]
    (uv,) = [t for t in derived if t.endswith("_w_uv")]
    torch.testing.assert_close(getattr(gm, uk), w[:, :P, :], rtol=0, atol=0)
    torch.testing.assert_close(getattr(gm, uv), w[:, P:, :].transpose(1, 2), rtol=0, atol=0)


def test_all_phases_reference_one_capture_per_phase(captures):
    layers = make_layers(3, seed=1)
    lowered = lower_layers(layers, "reference", block_size=BLOCK)
    assert sorted(captures) == ["decode", "mixed", "prefill"]
    for layer, low in zip(layers, lowered):
        for phase in ("prefill", "decode", "mixed"):
            assert compare_with_plain(layer, low, phase).ok, phase


def test_distinct_shapes_lowered_separately(captures):
    other = TINY.replace(num_heads=2)
    layers = make_layers(2) + make_layers(1, other) + make_layers(1)
    summary: list[LayerLowering] = []
    lowered = lower_layers(layers, "reference", ["decode"], block_size=BLOCK, summary=summary)
    assert captures == ["decode", "decode"]
    assert [g.layers for g in summary] == [[0, 1, 3], [2]]
    assert lowered[2].num_heads == 2
    assert compare_with_plain(layers[2], lowered[2], "decode").ok


def test_unrecorded_constant_falls_back_to_lowering_each_layer(captures, monkeypatch):
    real_lower = model_lowering.lower

    def lower_forgetting_recipes(*args, **kwargs):
        low = real_lower(*args, **kwargs)
        for gm in low.graphs.values():
            graph_meta(gm).derived_constants.clear()
        return low

    monkeypatch.setattr(model_lowering, "lower", lower_forgetting_recipes)
    layers = make_layers(2)
    summary = []
    lowered = lower_layers(layers, "npu", ["decode"], block_size=BLOCK, summary=summary)
    assert captures == ["decode", "decode"]
    assert not summary[0].reused and "_w_uk" in summary[0].reason
    assert compare_with_plain(layers[1], lowered[1], "decode").ok
    with pytest.raises(ValueError, match="no pass recorded"):
        rebind(lowered[0], layers[1])


def test_rejects_other_shapes_and_non_layers():
    low = lower(make_layers(1)[0], "reference", ["decode"], block_size=BLOCK)
    with pytest.raises(ValueError, match="cannot rebind"):
        rebind(low, make_layers(1, TINY.replace(num_heads=2))[0])
    with pytest.raises(TypeError, match=r"layers\[1\] is a Linear"):
        lower_layers([make_layers(1)[0], torch.nn.Linear(2, 2)], "reference")


def test_graph_mode_and_prefill_graphs_are_reused_too(captures):
    """torchair decode (prolog weights folded per layer, its own bucket runner per layer) and npu
    prefill (a weight-independent mask constant) are lowered once and re-bound."""
    config = MLAConfig.preset("deepseek-v3").replace(
        hidden_size=64, num_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16)
    layers = make_layers(2, config, seed=1, dtype=torch.bfloat16)
    lowered = lower_layers(layers, "torchair", ["decode", "prefill"], block_size=BLOCK,
                           target_options={"graph_batch_sizes": [4]})
    assert sorted(captures) == ["decode", "prefill"]
    assert lowered[0].runners["decode"] is not lowered[1].runners["decode"]
    assert all(low.runners["decode"].options.graph_batch_sizes == (4,) for low in lowered)
    for i, (layer, low) in enumerate(zip(layers, lowered)):
        for phase in ("decode", "prefill"):
            assert compare_with_plain(layer, low, phase, seed=i).ok


def test_rebound_torchair_layers_get_their_own_prolog_weights():
    """The prolog's [in, out] FRACTAL_NZ weights of every re-bound layer are cut (by the worker
    threads) from that layer's own weights: equal to its transposed weight, contiguous, a new tensor."""
    from conftest import V3_NPU

    from mla_graph.npu.formats import npu_format
    from mla_graph.npu.limits import ACL_FORMAT_FRACTAL_NZ

    layers = make_layers(3, V3_NPU, dtype=torch.bfloat16)
    lowered = lower_layers(layers, "torchair", ["decode"], block_size=BLOCK)
    for layer, low in zip(layers, lowered):
        gm = low.graphs["decode"]
        (prolog,) = [n for n in gm.graph.nodes if n.target is torch.ops.npu.npu_mla_prolog_v3_functional.default]
        for index, weight in ((1, layer.q_a_proj.weight), (2, layer.q_b_proj.weight), (4, layer.kv_a_proj_with_mqa.weight)):
            cut = getattr(gm, prolog.args[index].target)
            assert torch.equal(cut, weight.t()) and cut.is_contiguous(), index
            assert npu_format(cut) == ACL_FORMAT_FRACTAL_NZ
            assert cut.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr()
    # what the workers cut equals cutting in this thread
    own = model_lowering._layer_tensors(layers[2])
    again = model_lowering.derived_weights(lowered[0], own)
    done = model_lowering._cutter().submit(model_lowering.derived_weights, lowered[0], own).result()
    assert again.keys() == done.keys() and len(again) == 5   # W_UK, W_UV and the prolog's three
    assert all(torch.equal(again[k], done[k]) for k in again)


def test_a_forked_child_cuts_derived_weights_with_its_own_workers():
    """A process forked after lowering (vLLM's workers can be) lowers again without waiting on the
    parent's worker threads, which the child does not have (it hung before the at-fork reset)."""
    import os
    import time

    lower_layers(make_layers(2), "npu", ["decode"], block_size=BLOCK)   # the parent's workers exist now
    pid = os.fork()
    if pid == 0:
        try:
            lowered = lower_layers(make_layers(2, seed=1), "npu", ["decode"], block_size=BLOCK)
            os._exit(0 if len(lowered) == 2 else 1)
        except BaseException:
            os._exit(2)
    deadline = time.monotonic() + 60
    while not (done := os.waitpid(pid, os.WNOHANG))[0]:
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError("the forked child hung waiting for derived weights")
        time.sleep(0.2)
    assert os.waitstatus_to_exitcode(done[1]) == 0


def test_rebound_layers_have_their_own_graph_meta():
    """A pass run on one re-bound layer's graph (adding an input) leaves the other layers' alone."""
    from mla_graph.contract import GraphInput
    from mla_graph.passes.graph_utils import add_input

    lowered = lower_layers(make_layers(3), "npu", ["decode"], block_size=BLOCK)
    metas = [graph_meta(low.graphs["decode"]) for low in lowered]
    assert len({id(m) for m in metas}) == 3
    before = [list(m.inputs) for m in metas]
    gm = lowered[1].graphs["decode"]
    add_input(gm, GraphInput("extra"), None)
    assert [len(graph_meta(low.graphs["decode"]).inputs) for low in lowered] == \
        [len(before[0]), len(before[1]) + 1, len(before[2])]


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "enable_grad"])
def test_derived_weights_are_cut_under_the_callers_grad_mode(monkeypatch, mode):
    """Grad and inference modes are per thread: the worker that cuts derived weights takes the caller's."""
    monkeypatch.setattr(model_lowering, "derived_weights",
                        lambda template, own: (torch.is_grad_enabled(), torch.is_inference_mode_enabled()))
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "enable_grad": torch.enable_grad}
    with context[mode]():
        seen = model_lowering._cut_in_background(None, {}).result()
    assert seen == {"no_grad": (False, False), "inference_mode": (False, True), "enable_grad": (True, False)}[mode]

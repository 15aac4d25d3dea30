"""One capture per phase serves every batch size and context length of that phase."""
import pytest
import torch
from conftest import V3_TINY, randomize

from mla_graph import MLAAttention, capture
from mla_graph.inputs import Call
from mla_graph.runtime.binding import graph_inputs
from mla_graph.checking import random_batch
from mla_graph.passes import verify_graph


@pytest.mark.parametrize("phase, batches", [
    ("decode", [[(1, 3)], [(1, 40), (1, 7), (1, 130)], [(1, 2)] * 9]),
    ("prefill", [[(4, 0)], [(17, 0), (3, 30)], [(2, 0)] * 5 + [(40, 9)]]),
    ("mixed", [[(1, 5), (6, 0)], [(1, 40), (1, 1), (13, 22), (2, 0)]]),
])
def test_one_capture_serves_every_batch_of_its_phase(phase, batches):
    layer = randomize(MLAAttention(V3_TINY))
    gm = capture(layer, phase, block_size=16)
    for i, requests in enumerate(batches):
        batch = random_batch(layer, requests, block_size=16, seed=i)
        ref_cache, graph_cache = batch.cache.clone(), batch.cache.clone()
        expected = layer(batch.hidden_states, batch.positions, ref_cache, batch.metadata)
        call = Call(batch.hidden_states, batch.positions, graph_cache, batch.metadata)
        actual = gm(*graph_inputs(gm, call))
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
        assert torch.equal(ref_cache.latent, graph_cache.latent)


def test_every_node_has_a_fake_value_and_symbolic_sizes():
    layer = MLAAttention(V3_TINY)
    decode, mixed = capture(layer, "decode", block_size=16), capture(layer, "mixed", block_size=16)
    assert verify_graph(decode) == [] and verify_graph(mixed) == []
    ph = {n.name: n.meta["val"] for n in decode.graph.nodes if n.op == "placeholder"}
    # decode: one token per request, so T and B are one symbol; the sizes are symbols, not numbers
    assert str(ph["hidden_states"].shape[0]) == str(ph["block_table"].shape[0])
    assert not isinstance(ph["hidden_states"].shape[0], int)
    ph = {n.name: n.meta["val"] for n in mixed.graph.nodes if n.op == "placeholder"}
    assert str(ph["hidden_states"].shape[0]) != str(ph["block_table"].shape[0])
    assert all(n.meta.get("mla_pass") == "capture" for n in mixed.graph.nodes)


def test_capture_refers_to_the_layers_weights():
    layer = MLAAttention(V3_TINY)
    gm = capture(layer, "prefill")
    assert gm.kv_b_proj.weight is layer.kv_b_proj.weight
    assert gm.get_submodule("q_a_layernorm").weight is layer.q_a_layernorm.weight


def test_capture_rejects_bad_arguments():
    layer = MLAAttention(V3_TINY)
    with pytest.raises(ValueError, match="unknown phase 'verify'; expected one of prefill, decode, mixed"):
        capture(layer, "verify")
    with pytest.raises(ValueError, match="block_size must be a positive int, got 0"):
        capture(layer, "decode", block_size=0)
    with pytest.raises(TypeError, match="capture expects an MLAAttention, got Linear"):
        capture(torch.nn.Linear(2, 2), "decode")


def test_fake_values_of_a_linear_over_symbolic_sizes_outside_make_fx():
    """The verifier and passes re-run nodes on their fake values after capture, outside make_fx.
    kv_b_proj over the gathered cache is a linear of a [B, MB*block_size, L] input with two
    symbolic sizes: torch 2.10's C++ matmul refuses it (numel() on symbolic sizes) unless the
    Python dispatcher runs it, as make_fx does (mla_graph.torch_compat.fake_mode_context)."""
    from mla_graph.passes.graph_utils import fake_run

    gm = capture(randomize(MLAAttention(V3_TINY)), "prefill", block_size=16)
    linear = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default
                  and getattr(n.args[0], "target", None) is torch.ops.mla.gather_paged.default)
    fresh = fake_run(linear.target, linear.args, linear.kwargs)
    assert [str(s) for s in fresh.shape] == [str(s) for s in linear.meta["val"].shape]
    assert len(fresh.shape) == 3 and not all(isinstance(s, int) for s in fresh.shape)

"""The typed contract between capture, passes and runtime (mla_graph.contract): every graph input is a
GraphInput declared by whoever adds it and found by what it reads, never by its name; what a graph
is lives in one GraphMeta."""
import operator

import pytest
import torch
from conftest import V2_LITE_NPU, V3_TINY, randomize
from pass_graphs import GraphBuilder, inputs_for
from test_pass_units import paged_values
from torch.fx import GraphModule

from mla_graph import MLAAttention, capture, lower
from mla_graph.inputs import Call
from mla_graph.runtime.binding import graph_inputs
from mla_graph.checking import random_batch
from mla_graph.npu import ensure_npu_ops
from mla_graph.npu.air_ops import ensure_air_ops
from mla_graph import contract
from mla_graph.contract import GraphMeta, graph_meta, input_of
from mla_graph.dumptool.render import format_graph
from mla_graph.passes.npu_lower import CONTEXT_SLOTS, ROPE_COS, ROPE_SIN, SEQ_LENS_LIST
from mla_graph.testing import check_pass
from mla_graph.passes.torchair_lower import SEQ_LENS_INT64, lengths_as_tensors

bf16, i32 = torch.bfloat16, torch.int32


@pytest.fixture(scope="module", autouse=True)
def _ops():
    ensure_npu_ops()
    ensure_air_ops()


def test_capture_declares_the_definitions_inputs():
    gm = capture(MLAAttention(V3_TINY), "mixed", block_size=16)
    meta = graph_meta(gm)
    assert isinstance(meta, GraphMeta) and (meta.phase, meta.block_size, meta.config) == ("mixed", 16, V3_TINY)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert [input_of(n) for n in placeholders] == meta.inputs == list(contract.INPUTS)
    assert {i.name: i.per for i in meta.inputs if i.per == "layer"} == \
        {"hidden_states": "layer", "latent_cache": "layer", "rope_cache": "layer"}


def test_passes_declare_what_they_add():
    """The npu lowering's added inputs are the ones its module declares (identity, not name); a
    split mixed batch's parts read the same kinds from their part of the call."""
    layer = MLAAttention(V2_LITE_NPU, dtype=bf16)
    low = lower(layer, "npu", block_size=16)
    decode = graph_meta(low.graphs["decode"]).inputs
    assert decode[:8] == list(contract.INPUTS)
    assert {ROPE_COS, ROPE_SIN, SEQ_LENS_LIST} <= set(decode) and SEQ_LENS_LIST.on == "host"
    mixed = graph_meta(low.graphs["mixed"]).inputs
    parts = {(i.part, i.kind) for i in mixed if i.part}
    assert {("decode", contract.SEQ_LENS), ("prefill", contract.SEQ_LENS), ("decode", SEQ_LENS_LIST),
            ("prefill", CONTEXT_SLOTS)} <= parts, parts
    assert all(i.name == f"{i.part}_{i.kind.name}" and i.key == i.kind.name for i in mixed if i.part)
    # the dumps say where each input comes from
    header = format_graph(low.graphs["mixed"]).split("\n")[1]
    assert header.startswith("# inputs: hidden_states (device, per layer), positions (device, per step)")
    assert "rope_cos (device, per step, memo)" in header and "decode_seq_lens_list (host, per step, decode part)" in header


def test_inputs_are_found_by_what_they_read_not_by_name():
    """Every placeholder renamed: the runtime still gives each its value, the output is the same."""
    layer = randomize(MLAAttention(V2_LITE_NPU, dtype=bf16))
    low = lower(layer, "npu", ["mixed"], block_size=16)
    gm = low.graphs["mixed"]
    batch = random_batch(layer, [(1, 19), (1, 3), (40, 0), (40, 12)], block_size=16, seed=0)

    def run():
        cache = batch.cache.clone()
        return gm(*graph_inputs(gm, Call(batch.hidden_states, batch.positions, cache, batch.metadata,
                                         layer.cos_sin))), cache

    want, want_cache = run()
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        node.name = node.target = f"input_{i}"
    gm.recompile()
    got, got_cache = run()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_cache.latent, want_cache.latent, rtol=0, atol=0)


def test_lengths_as_tensors_follows_the_input_not_its_name():
    b = GraphBuilder(phase="decode", dtype=bf16, block_size=16)
    B, NB, MB = b.sym("num_reqs", 3), b.sym("num_blocks", 13), b.sym("max_blocks", 5)
    q, q_pe = b.input("q", (B, 2, 1, 512), bf16), b.input("q_pe", (B, 2, 1, 64), bf16)
    k, k_pe = b.input("latent_cache", (NB, 1, 16, 512), bf16), b.input("rope_cache", (NB, 1, 16, 64), bf16)
    bt = b.input("block_table", (B, MB), i32)
    b.input("seq_lens", (B,), i32)
    lengths = b.input("seq_lens_list", value=[])
    lengths.name = "whatever_a_user_pass_called_it"
    fia = b.op(torch.ops.npu.npu_fused_infer_attention_score.default, q, k, k, query_rope=q_pe, key_rope=k_pe,
               actual_seq_lengths_kv=lengths, block_table=bt, num_heads=2, scale=0.1, input_layout="BNSD",
               num_key_value_heads=1, sparse_mode=0, block_size=16)
    gm = b.finish(b.op(operator.getitem, fia, 0))
    batch = paged_values([(1, 20), (1, 5)], dtype=bf16, latent=512, rope=64, block=16, num_blocks=5,
                         nan_outside=False)
    values = {"q": batch["ql"][:, :, None], "q_pe": batch["q_pe"][:, :, None],
              "latent_cache": batch["latent_cache"].view(5, 1, 16, 512),
              "rope_cache": batch["rope_cache"].view(5, 1, 16, 64), "block_table": batch["block_table"],
              "seq_lens": batch["seq_lens"], "whatever_a_user_pass_called_it": batch["seq_lens"].tolist(),
              "seq_lens_int64": batch["seq_lens"].to(torch.int64)}
    check = check_pass(lengths_as_tensors, gm, make_inputs=inputs_for(values), expect_matches=1)
    assert [input_of(n) for n in gm.graph.nodes if n.op == "placeholder"][-1] is SEQ_LENS_INT64
    assert SEQ_LENS_LIST not in graph_meta(gm).inputs and check.record.changed


def test_a_graph_without_graph_meta_is_named():
    gm = GraphModule(torch.nn.Module(), torch.fx.Graph())
    with pytest.raises(ValueError, match=r"not captured by mla_graph.capture .*gm.meta\['mla'\]"):
        graph_meta(gm)


def test_a_part_input_only_for_a_known_part():
    with pytest.raises(ValueError, match="part must be one of"):
        contract.SEQ_LENS.of_part("middle")


def test_context_slots_are_each_requests_first_seq_len_slots_through_its_block_table():
    """The npu target's context_slots input (mla_graph.inputs), computed without a loop over requests,
    against the definition written request by request (blocks of the row, then the slot in the block)."""
    from mla_graph.inputs import context_slots
    from mla_graph.metadata import MLAMetadata

    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        B, block, width = (int(torch.randint(low, high, (1,), generator=gen)) for low, high in ((0, 5), (1, 9), (1, 6)))
        seq_lens = torch.randint(0, width * block + 1, (B,), generator=gen).to(torch.int32)
        table = torch.randint(0, 50, (B, width), generator=gen).to(torch.int32)
        md = MLAMetadata(slot_mapping=torch.zeros(0, dtype=torch.int64), block_table=table, seq_lens=seq_lens,
                         query_start_loc=torch.zeros(B + 1, dtype=torch.int32), num_decodes=0, num_decode_tokens=0,
                         num_prefills=B)
        expected = [int(table[b, t // block]) * block + t % block for b in range(B) for t in range(int(seq_lens[b]))]
        got = context_slots(md, block)
        assert got.dtype == torch.int64 and got.tolist() == expected

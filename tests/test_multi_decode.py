"""Multi-token decode: decode requests with 1..16 new tokens over a cached context (speculative
decoding's verification, DeepSeek's MTP), causal among themselves.

A batch of such decodes runs the "multi_decode" graph, captured and lowered like the other phases
(absorbed, paged; FIA's MLA mode in the TND layout on npu). A batch that mixes them with prefills
runs the prefill graph. Judged against Hugging Face's DeepseekV3Attention over each request's
whole sequence, and against the plain definition on the same batch.
"""
import dataclasses
import math

import pytest
import torch
from conftest import TOL, V2_LITE_NPU, V3_TINY, randomize
from hf_oracle import hf_attention, hf_prefill

from mla_graph import (ALL_PHASES, MAX_DECODE_TOKENS, LoweringError, MLAAttention, PagedLatentCache, build_metadata, lower,
                       positions_for)
from mla_graph.contract import graph_meta

BS = 16
TARGETS = ["reference", "cpu", "npu", "torchair"]
npu = torch.ops.npu


def _pair(config, dtype, std=0.2):
    hf, rotary = hf_attention(config, dtype)
    randomize(hf, 3, std=std)   # the NPU-sized config at 0.02: at 0.2 its logits are huge and bf16 noise dominates
    ours = MLAAttention(config, dtype=dtype)
    ours.load_state_dict(hf.state_dict(), strict=True)
    return ours.requires_grad_(False), hf.requires_grad_(False), rotary


@pytest.fixture(scope="module")
def tiny():
    return _pair(V3_TINY, torch.float32)


@pytest.fixture(scope="module")
def tiny_lowered(tiny):
    """Each target's module over the tiny layer, every phase lowered (once for the module's tests;
    the cache each call writes is its own)."""
    modules = {}

    def get(target: str):
        if target not in modules:
            options = {"graph_decode_tokens": [16]} if target == "torchair" else None   # graph mode: a bucket of 16
            modules[target] = lower(tiny[0], target, ALL_PHASES, block_size=BS, target_options=options)
        return modules[target]
    return get


def _run(lowered, layer, hf, rotary, steps, *, block_size=BS, decode_tokens=MAX_DECODE_TOKENS, dtype=torch.float32):
    """Each request's context prefilled, then `steps` ([(new, cached) per request] each) one batch
    at a time, by `lowered`; the same batches by the plain definition on a copy of the cache.
    Returns (ours, plain, hf) outputs of the last step's new tokens, per request."""
    config = layer.config
    total = max(sum(s[b][0] for s in steps) + steps[0][b][1] for b in range(len(steps[0])))
    cache = PagedLatentCache.allocate(config, 2 + len(steps[0]) * -(-total // block_size), block_size, dtype=dtype,
                                      shuffle_blocks=True)
    gen = torch.Generator().manual_seed(1)
    lengths = [steps[0][b][1] + sum(s[b][0] for s in steps) for b in range(len(steps[0]))]
    sequences = [torch.randn(n, config.hidden_size, generator=gen).to(dtype) for n in lengths]
    rows = [cache.allocator.grow([], n, block_size) for n in lengths]
    prefill = [(steps[0][b][1], 0) for b in range(len(steps[0])) if steps[0][b][1] > 0]
    prefilled = [b for b in range(len(steps[0])) if steps[0][b][1] > 0]
    if prefill:
        md = build_metadata(prefill, [rows[b] for b in prefilled], block_size)
        x = torch.cat([sequences[b][:steps[0][b][1]] for b in prefilled])
        lowered(x, positions_for(prefill), cache, md)
    plain_cache = PagedLatentCache(cache.latent.clone(), cache.rope.clone())
    for step in steps:
        md = build_metadata(step, rows, block_size, decode_tokens=decode_tokens)
        x = torch.cat([sequences[b][cached:cached + new] for b, (new, cached) in enumerate(step)])
        positions = positions_for(step)
        ours = lowered(x, positions, cache, md)
        plain = layer(x, positions, plain_cache, md)
    starts = md.query_start_loc.tolist()
    expected = [hf_prefill(hf, rotary, seq)[-new:] for seq, (new, _) in zip(sequences, steps[-1])]
    return ([ours[a:e] for a, e in zip(starts, starts[1:])], [plain[a:e] for a, e in zip(starts, starts[1:])],
            expected, md)


def _assert_close(got, want, dtype, what):
    """The dtype's layer tolerance, atol at least 3 ulps of the largest output (o_proj sums every
    head's output: a small output carries its large terms' rounding; test_npu_target's rule)."""
    rtol, atol = TOL[dtype]
    for b, (g, w) in enumerate(zip(got, want)):
        largest = w.float().abs().max().item()
        ulp = 2.0 ** math.floor(math.log2(largest)) * torch.finfo(dtype).eps
        torch.testing.assert_close(g.float(), w.float(), atol=max(atol, 3 * ulp), rtol=rtol,
                                   msg=lambda m: f"{what}, request {b}: {m}")


# (new tokens, cached tokens) per request, per step; the contexts cross 16-token blocks
MULTI = [[(4, 20), (1, 33), (16, 7), (2, 16)]]
MIXED = [[(3, 21), (1, 9), (16, 30), (12, 0)]]                    # decodes of 3, 1, 16 tokens and a prompt
TWO_STEPS = [[(4, 20), (2, 5)], [(3, 24), (5, 7)]]                 # verification after verification


CASES = {"decodes": (MULTI, "multi_decode"), "mixed": (MIXED, "multi_mixed"), "two-steps": (TWO_STEPS, "multi_decode")}


# torchair: graph mode for multi_decode only (its multi_mixed graph is the npu target's, eager); the second
# step of verifications on the targets whose kernels differ most
@pytest.mark.parametrize("target, case", [(t, "decodes") for t in TARGETS] + [(t, "mixed") for t in TARGETS[:3]]
                         + [("reference", "two-steps"), ("cpu", "two-steps")])
def test_multi_token_decodes_equal_hf_and_the_plain_definition(target, case, tiny, tiny_lowered):
    steps, phase = CASES[case]
    layer, hf, rotary = tiny
    lowered = tiny_lowered(target)
    calls = lowered.graph_calls.copy()
    ours, plain, expected, md = _run(lowered, layer, hf, rotary, steps)
    assert md.phase == phase and md.multi_token_decodes
    assert lowered.graph_calls[phase] == calls[phase] + len(steps), "the batch did not run its phase's graph"
    _assert_close(ours, plain, torch.float32, f"{target} vs the plain definition")
    _assert_close(ours, expected, torch.float32, f"{target} vs Hugging Face")


@pytest.mark.parametrize("target", ["cpu", "npu"])
def test_a_multi_mixed_batch_is_split_at_the_decodes_tokens(target, tiny_lowered):
    """Its decodes (several tokens each) and its prompts attend apart, cut after num_decode_tokens
    tokens (the decode part's own slot_mapping gives the count), as one-token mixed batches are."""
    gm = tiny_lowered(target).graphs["multi_mixed"]
    assert {"decode_slot_mapping", "decode_seq_lens", "prefill_seq_lens"} <= set(graph_meta(gm).input_names)
    assert _matches(tiny_lowered(target), "multi_mixed")["split_mixed_batch"] == 1


def _matches(lowered, phase: str) -> dict[str, int]:
    return {r.name: r.matches for r in lowered.reports[phase].records}


def test_one_token_decodes_still_run_the_decode_graph(tiny, tiny_lowered):
    layer, hf, rotary = tiny
    lowered = tiny_lowered("cpu")
    ours, plain, expected, md = _run(lowered, layer, hf, rotary, [[(1, 20), (1, 3)]])
    assert (md.phase, lowered._lowered_phase(md.phase)) == ("decode", "decode")
    _assert_close(ours, expected, torch.float32, "cpu decode vs Hugging Face")


def test_npu_multi_decode_is_fia_mla_in_the_tnd_layout():
    """bf16 at the dims FIA's MLA mode takes: the multi_decode graph's attention is one FIA call,
    TND, causal (sparse_mode 3) over the paged latent cache, as vllm-ascend runs MTP; its
    results equal Hugging Face's."""
    layer, hf, rotary = _pair(V2_LITE_NPU, torch.bfloat16, std=0.02)
    lowered = lower(layer, "npu", ["prefill", "multi_decode", "multi_mixed"], block_size=128)
    fia = [n for n in lowered.graphs["multi_decode"].graph.nodes if n.target is npu.npu_fused_infer_attention_score.default]
    assert len(fia) == 1, lowered.graphs["multi_decode"].graph
    kwargs = fia[0].kwargs
    assert (kwargs["input_layout"], kwargs["sparse_mode"], kwargs["num_key_value_heads"]) == ("TND", 3, 1)
    assert kwargs["query_rope"] is not None and kwargs["block_table"] is not None
    assert kwargs["actual_seq_lengths"].name == "query_ends_list"   # cumulative query ends, as TND takes them
    ours, plain, expected, md = _run(lowered, layer, hf, rotary, [[(5, 130), (16, 40), (1, 200)]], block_size=128,
                                     dtype=torch.bfloat16)
    assert md.phase == "multi_decode"
    _assert_close(ours, plain, torch.bfloat16, "npu vs the plain definition")
    _assert_close(ours, expected, torch.bfloat16, "npu vs Hugging Face")
    # beside a prompt: the decode part in MLA mode (its own query ends), the prompt in the TND prefill form
    mixed = lowered.graphs["multi_mixed"]
    layouts = sorted((n.kwargs["input_layout"], n.kwargs["sparse_mode"], n.kwargs.get("query_rope") is not None,
                      n.kwargs["actual_seq_lengths"].name) for n in mixed.graph.nodes
                     if n.target is npu.npu_fused_infer_attention_score.default)
    assert layouts == [("TND", 3, False, "prefill_query_ends_list"), ("TND", 3, True, "decode_query_ends_list")]
    ours, plain, expected, md = _run(lowered, layer, hf, rotary, [[(5, 130), (1, 200), (20, 0)]], block_size=128,
                                     dtype=torch.bfloat16)
    assert md.phase == "multi_mixed" and lowered.graph_calls["multi_mixed"] == 1
    _assert_close(ours, plain, torch.bfloat16, "npu multi_mixed vs the plain definition")
    _assert_close(ours, expected, torch.bfloat16, "npu multi_mixed vs Hugging Face")


def test_fia_never_takes_more_than_16_tokens_a_request():
    """Checked mode refuses a decode of 17 tokens in the metadata; unchecked, FIA's emulation refuses
    it as the kernel's documented limit does, before writing anything."""
    layer, _, _ = _pair(V2_LITE_NPU, torch.bfloat16)
    requests = [(2, 10), (17, 20)]
    cache = PagedLatentCache.allocate(V2_LITE_NPU, 4, 128, dtype=torch.bfloat16)
    rows = [cache.allocator.grow([], n + c, 128) for n, c in requests]
    md = dataclasses.replace(build_metadata(requests, rows, 128, decode_tokens=2), num_decodes=2,
                             num_decode_tokens=19, num_prefills=0)
    x = torch.randn(19, V2_LITE_NPU.hidden_size, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="decode request 1 has 17 new tokens; a decode request has 1 to 16"):
        lower(layer, "npu", ["multi_decode"], block_size=128, checked=True)(x, positions_for(requests), cache, md)
    with pytest.raises(ValueError, match="query tokens per request=17 is outside the documented limits"):
        lower(layer, "npu", ["multi_decode"], block_size=128, checked=False)(x, positions_for(requests), cache, md)


def test_multi_token_decodes_need_their_graph_or_the_prefill_graph(tiny, tiny_lowered):
    layer, hf, rotary = tiny
    lowered = lower(layer, "cpu", ["decode", "mixed"], block_size=BS)
    requests = [(3, 20), (1, 5)]
    cache = PagedLatentCache.allocate(V3_TINY, 8, BS)
    rows = [cache.allocator.grow([], n + c, BS) for n, c in requests]
    md = build_metadata(requests, rows, BS, decode_tokens=4)
    before = cache.latent.clone()
    with pytest.raises(LoweringError, match="only the 'multi_decode' graph or the 'prefill' graph runs, but only "
                                            "\\['decode', 'mixed'\\] were lowered"):
        lowered(torch.randn(4, V3_TINY.hidden_size), positions_for(requests), cache, md)
    assert torch.equal(cache.latent, before), "a refused call wrote the cache"
    # without its own graph, a multi-token batch runs the prefill graph, which takes any request as it comes
    fallback = lower(layer, "cpu", ["prefill", "decode", "mixed"], block_size=BS)
    for steps in (MULTI, MIXED):
        ours, _, expected, md = _run(fallback, layer, hf, rotary, steps)
        assert fallback._lowered_phase(md.phase) == "prefill"
        _assert_close(ours, expected, torch.float32, f"cpu, prefill graph for a {md.phase} batch vs Hugging Face")


def test_multi_decode_is_captured_with_its_own_token_count(tiny_lowered):
    gm = tiny_lowered("cpu").graphs["multi_decode"]
    meta = graph_meta(gm)
    assert meta.phase == "multi_decode" and meta.attention_form == "absorbed"
    assert {"T", "B"} <= set(meta.symbols.values())


# ---- graph mode (torchair): a static graph per (batch size, tokens per request) -----------------------

GRAPH_OPTIONS = {"graph_batch_sizes": [2, 4], "graph_decode_tokens": [4, 16], "max_blocks_per_req": 4}


@pytest.mark.parametrize("config, dtype, block", [(V3_TINY, torch.float32, BS), (V2_LITE_NPU, torch.bfloat16, 128)],
                         ids=["tiny-fp32", "v2lite-npu-bf16"])
def test_torchair_runs_multi_token_decodes_in_padded_buckets(config, dtype, block):
    """Requests padded to the bucket's tokens per request (their padded draft positions write the
    padding block) and the batch to its batch size (padded requests over the padding block): the
    real tokens' outputs equal Hugging Face's and the plain definition's, and no cache slot but the
    real tokens' and the padding block's is written."""
    layer, hf, rotary = _pair(config, dtype, std=0.02 if config is V2_LITE_NPU else 0.2)
    lowered = lower(layer, "torchair", ["prefill", "multi_decode"], block_size=block, target_options=GRAPH_OPTIONS)
    runner = lowered.runners["multi_decode"]
    for steps, bucket in (([[(3, 20), (1, 33), (4, 7)]], (4, 4)), ([[(16, 40), (2, 3)]], (2, 16))):
        ours, plain, expected, md = _run(lowered, layer, hf, rotary, steps, block_size=block, dtype=dtype)
        assert md.phase == "multi_decode" and runner.buckets[-1] == bucket
        _assert_close(ours, plain, dtype, f"torchair bucket {bucket} vs the plain definition")
        _assert_close(ours, expected, dtype, f"torchair bucket {bucket} vs Hugging Face")
    assert len(runner.runner.graphs) == 2, "one graph per bucket run"


def test_torchair_padded_positions_write_only_the_padding_block():
    layer, _, _ = _pair(V3_TINY, torch.float32)
    lowered = lower(layer, "torchair", ["multi_decode"], block_size=BS, target_options=GRAPH_OPTIONS)
    requests = [(2, 14), (3, 30)]     # request 0's padded positions run past its last block
    cache = PagedLatentCache.allocate(V3_TINY, 12, BS, shuffle_blocks=True)
    rows = [cache.allocator.grow([], n + c, BS) for n, c in requests]
    cache.latent.normal_(generator=torch.Generator().manual_seed(5))
    md = build_metadata(requests, rows, BS, decode_tokens=4)
    before = cache.latent.clone()
    lowered(torch.randn(5, V3_TINY.hidden_size), positions_for(requests), cache, md)
    changed = (cache.latent != before).flatten(2).any(-1).nonzero().tolist()   # (block, row) of every written slot
    written = {(s // BS, s % BS) for s in md.slot_mapping.tolist()}
    assert written <= {tuple(x) for x in changed}, "a real token's slot was not written"
    assert {tuple(x) for x in changed} - written <= {(0, r) for r in range(BS)}, \
        "a padded position wrote outside the padding block"


def test_torchair_multi_decode_options_and_limits():
    layer, _, _ = _pair(V3_TINY, torch.float32)
    for bad in ([0], [17], [], "4", [2.0]):
        with pytest.raises(ValueError, match="graph_decode_tokens must be a non-empty list of ints in 1..16"):
            lower(layer, "torchair", ["multi_decode"], block_size=BS, target_options={"graph_decode_tokens": bad})
    lowered = lower(layer, "torchair", ["multi_decode"], block_size=BS, target_options=GRAPH_OPTIONS)
    assert lowered.options.graph_decode_tokens == (4, 16)
    requests = [(5, 10)]
    cache = PagedLatentCache.allocate(V3_TINY, 4, BS)
    rows = [cache.allocator.grow([], 15, BS)]
    small = lower(layer, "torchair", ["multi_decode"], block_size=BS, target_options={"graph_decode_tokens": [4]})
    with pytest.raises(ValueError, match="a decode request of 5 new tokens exceeds the largest graph_decode_tokens 4"):
        small(torch.randn(5, V3_TINY.hidden_size), positions_for(requests), cache,
              build_metadata(requests, rows, BS, decode_tokens=5))


def test_torch_compile_refuses_multi_token_decodes_it_cannot_carry(tiny):
    """Under torch.compile a layer is one mla::layer op that carries num_decodes and num_prefills
    only: a multi-token decode batch is refused with what to do, rather than run as one-token decodes."""
    layer, _, _ = tiny
    requests = [(3, 20), (1, 5)]
    cache = PagedLatentCache.allocate(V3_TINY, 8, BS)
    rows = [cache.allocator.grow([], n + c, BS) for n, c in requests]
    md = build_metadata(requests, rows, BS, decode_tokens=4)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    with pytest.raises(Exception, match="multi-token decodes under torch.compile \\(num_decode_tokens 4 for 2 "
                                        "decode requests\\)"):
        compiled(torch.randn(4, V3_TINY.hidden_size), positions_for(requests), cache, md)
    torch._dynamo.reset()

"""mla_cpu::paged_attention (the cpu target's latent attention) against textbook softmax attention in
float64, and the pass that emits it."""
import pytest
import torch
from torch.testing import FileCheck

from conftest import CONFIGS, randomize
from mla_graph import MLAAttention
from mla_graph.capture import capture
from mla_graph.inputs import Call
from mla_graph.runtime.binding import graph_inputs
from mla_graph.checking import PHASE_BATCHES, random_batch
from mla_graph.cpu_kernels import KEY_CHUNK
from mla_graph.passes import PassManager, eliminate_dead_code, remove_noop_views
from mla_graph.passes.absorb import absorb_kv_weights
from mla_graph.passes.cost_model import choose_attention_form
from mla_graph.passes.cpu_lower import lower_paged_attention_to_cpu
from mla_graph.passes.page import page_latent_attention

L, R = 48, 16
# Allowed max |kernel - textbook| relative to the textbook output's largest element, in eps of the
# dtype. float32: float32 scores over L+R dims and a softmax over up to ~2.5k keys, a few eps
# measured. bf16: the output is rounded to bf16 (half an eps) and the probabilities meet the latent
# as bf16 (each off by up to half an eps, averaged over the keys): measured below 1 eps.
KERNEL_EPS = {torch.float32: 16.0, torch.bfloat16: 2.0}


def textbook(q, q_rope, latent, rope, table, starts, seq_lens, scale):
    """float64 softmax(scale * q.k) v over each request's slots, causal within its new tokens; rows
    owned by no request are zero."""
    T, N, _ = q.shape
    bs = latent.shape[1]
    out = torch.zeros(T, N, latent.shape[-1], dtype=torch.float64)
    for b, s in enumerate(seq_lens):
        t0, t1 = starts[b], starts[b + 1]
        slots = [(int(table[b][p // bs]), p % bs) for p in range(s)]
        c = torch.stack([latent[blk, off, 0] for blk, off in slots]).double()
        k = torch.cat([c, torch.stack([rope[blk, off, 0] for blk, off in slots]).double()], -1)
        for i in range(t1 - t0):
            visible = s - (t1 - t0) + i + 1
            query = torch.cat([q[t0 + i], q_rope[t0 + i]], -1).double()            # [N, L+R]
            weights = torch.softmax(scale * query @ k[:visible].T, dim=-1)
            out[t0 + i] = weights @ c[:visible]
    return out


def paged_batch(dtype, bs, requests, *, seed=0, extra_rows=0, width=None):
    """requests: (new tokens, seq_len) each. Blocks handed out in shuffled order; every slot no request
    owns (other blocks, the tail of a last block, the padding block 0) holds NaN."""
    gen = torch.Generator().manual_seed(seed)
    blocks_needed = sum(-(-s // bs) for _, s in requests)
    physical = (torch.randperm(blocks_needed, generator=gen) + 1).tolist()    # never block 0
    num_blocks = blocks_needed + 3
    if width is None:
        latent = torch.full((num_blocks, bs, 1, L), float("nan"), dtype=dtype)
        rope = torch.full((num_blocks, bs, 1, R), float("nan"), dtype=dtype)
    else:   # vLLM's layout: latent and rope side by side in one [.., L+R] cache, rows strided
        whole = torch.full((num_blocks, bs, 1, width), float("nan"), dtype=dtype)
        latent, rope = whole[..., :L], whole[..., L:L + R]
    max_blocks = max(-(-s // bs) for _, s in requests) + 1
    table = torch.zeros(len(requests), max_blocks, dtype=torch.int32)     # past the context: padding block 0
    for b, (_, s) in enumerate(requests):
        for j in range(-(-s // bs)):
            table[b, j] = physical.pop()
        for p in range(s):
            blk = table[b, p // bs]
            latent[blk, p % bs, 0] = torch.randn(L, generator=gen).to(dtype)
            rope[blk, p % bs, 0] = torch.randn(R, generator=gen).to(dtype)
    T = sum(t for t, _ in requests) + extra_rows
    q = torch.randn(T, 3, L, generator=gen).to(dtype)
    q_rope = torch.randn(T, 3, R, generator=gen).to(dtype)
    starts = [0]
    for t, _ in requests:
        starts.append(starts[-1] + t)
    return q, q_rope, latent, rope, table, starts, [s for _, s in requests]


def _check(dtype, args, scale=0.2):
    q, q_rope, latent, rope, table, starts, seq_lens = args
    out = torch.ops.mla_cpu.paged_attention(q, q_rope, latent, rope, table, torch.tensor(starts, dtype=torch.int32),
                                            torch.tensor(seq_lens, dtype=torch.int32), scale)
    expected = textbook(q, q_rope, latent, rope, table, starts, seq_lens, scale)
    assert out.dtype == dtype and out.shape == q.shape
    relative = float((out.double() - expected).abs().max() / expected.abs().max())
    assert relative <= KERNEL_EPS[dtype] * torch.finfo(dtype).eps, relative
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bs", [4, 16])
def test_decode_equals_textbook_attention_over_ragged_shuffled_blocks(dtype, bs):
    """One token per request; seq_lens ragged, most not a multiple of the block size (one exactly
    is); blocks shuffled; NaN in every slot no request owns: reading one would show."""
    requests = [(1, 37), (1, 5), (1, 2 * bs), (1, 1), (1, 130)]
    _check(dtype, paged_batch(dtype, bs, requests))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_several_new_tokens_are_causal_and_padding_rows_are_zero(dtype):
    """Prefill chunks ride with decodes (mixed batch): query i of t sees keys j <= i + seq_len - t;
    a request with no new tokens computes nothing; rows past the last request are zero."""
    requests = [(1, 19), (7, 7), (0, 9), (5, 17)]
    args = paged_batch(dtype, 4, requests, extra_rows=2)
    out = _check(dtype, args)
    assert torch.equal(out[-2:], torch.zeros_like(out[-2:]))


def test_keys_past_one_chunk_are_converted_chunk_by_chunk():
    """bf16 keys go through the float32 chunk buffer KEY_CHUNK at a time: a context of two chunks
    and a part, not a multiple of the block size."""
    _check(torch.bfloat16, paged_batch(torch.bfloat16, 128, [(1, 2 * KEY_CHUNK + 77), (1, 300)]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_strided_views_of_one_cache(dtype):
    """vLLM keeps latent and rope side by side in one cache: both are strided views of it."""
    _check(dtype, paged_batch(dtype, 8, [(1, 21), (2, 9)], width=L + R + 8))


def test_schema_and_fake_kernel():
    """torch.library's own checks: the schema, the fake kernel's shapes, no aliasing of inputs."""
    q, q_rope, latent, rope, table, starts, seq_lens = paged_batch(torch.float32, 4, [(1, 9), (3, 6)])
    latent, rope = latent.nan_to_num(), rope.nan_to_num()
    torch.library.opcheck(torch.ops.mla_cpu.paged_attention.default,
                          (q, q_rope, latent, rope, table, torch.tensor(starts), torch.tensor(seq_lens), 0.5),
                          test_utils=("test_schema", "test_faketensor"))


# ---- the pass -------------------------------------------------------------------------------------
UP_TO_PAGE = [remove_noop_views, choose_attention_form, absorb_kv_weights, page_latent_attention, eliminate_dead_code]


def _run(gm, batch, layer):
    call = Call(batch.hidden_states, batch.positions, batch.cache.clone(), batch.metadata, layer.cos_sin)
    return gm(*graph_inputs(gm, call))


@pytest.mark.parametrize("phase", ["decode", "mixed"])
def test_pass_lowers_every_paged_attention_and_keeps_the_numbers(phase):
    layer = randomize(MLAAttention(CONFIGS["v3"]))
    gm = capture(layer, phase, block_size=16)
    PassManager(UP_TO_PAGE).run(gm)
    batch = random_batch(layer, PHASE_BATCHES[phase], block_size=16, seed=3)
    before = _run(gm, batch, layer)
    result = lower_paged_attention_to_cpu(gm)
    gm.recompile()
    assert result.matches == result.matches_by_rule["paged latent attention -> per-request GEMMs"] == 1
    FileCheck().check_count("torch.ops.mla_cpu.paged_attention.default", 1, exactly=True) \
        .check_not("torch.ops.mla.paged_attention").run(gm.code)
    torch.testing.assert_close(_run(gm, batch, layer), before, rtol=1e-5, atol=1e-5)


def test_pass_does_not_fire_without_paged_attention():
    """Prefill keeps the decompressed form (the cost model's choice): nothing to lower."""
    layer = randomize(MLAAttention(CONFIGS["v3"]))
    gm = capture(layer, "prefill", block_size=16)
    PassManager(UP_TO_PAGE).run(gm)
    code = gm.code
    result = lower_paged_attention_to_cpu(gm)
    gm.recompile()
    assert not result.changed and result.matches == 0 and gm.code == code


# ---- mla_cpu::attention (the decompressed form) ----------------------------------------------------

def dense_batch(dtype, requests, *, heads=3, dq=24, dv=10, kv_heads=3, extra_rows=0, seed=0):
    """q [T, N, Dq], k [B, S, Nk, Dq], v [B, S, Nk, Dv] (S the longest context; keys past a request's
    own are NaN: reading one would show), query_start_loc, seq_lens."""
    gen = torch.Generator().manual_seed(seed)
    T = sum(t for t, _ in requests) + extra_rows
    S = max(s for _, s in requests)
    q = torch.randn(T, heads, dq, generator=gen).to(dtype)
    k = torch.full((len(requests), S, kv_heads, dq), float("nan"), dtype=dtype)
    v = torch.full((len(requests), S, kv_heads, dv), float("nan"), dtype=dtype)
    for b, (_, s) in enumerate(requests):
        k[b, :s] = torch.randn(s, kv_heads, dq, generator=gen).to(dtype)
        v[b, :s] = torch.randn(s, kv_heads, dv, generator=gen).to(dtype)
    starts = [0]
    for t, _ in requests:
        starts.append(starts[-1] + t)
    return q, k, v, torch.tensor(starts), torch.tensor([s for _, s in requests])


def dense_textbook(q, k, v, starts, seq_lens, scale):
    """float64 softmax(scale * q.k) v per request and head, query i of t seeing keys j <= i + s - t."""
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float64)
    for b, s in enumerate(seq_lens.tolist()):
        t0, t1 = int(starts[b]), int(starts[b + 1])
        for i in range(t1 - t0):
            visible = s - (t1 - t0) + i + 1
            for n in range(q.shape[1]):
                kn, vn = k[b, :visible, n % k.shape[2]].double(), v[b, :visible, n % v.shape[2]].double()
                p = torch.softmax(scale * (kn @ q[t0 + i, n].double()), 0)
                out[t0 + i, n] = p @ vn
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_heads", [3, 1], ids=["per-head", "one-kv-head"])
def test_dense_attention_equals_textbook_in_causal_row_blocks(dtype, kv_heads, monkeypatch):
    """Prompts longer than a query block (the blocks see growing key ranges), chunks after a cached
    prefix, a request with no new tokens, padding rows: against float64 softmax attention."""
    import mla_graph.cpu_kernels as kernels
    monkeypatch.setattr(kernels, "QUERY_BLOCK", 8)
    requests = [(19, 19), (5, 12), (0, 4), (1, 30), (17, 40)]
    q, k, v, starts, seq_lens = dense_batch(dtype, requests, kv_heads=kv_heads, extra_rows=2)
    out = torch.ops.mla_cpu.attention(q, k, v, starts, seq_lens, 0.3)
    expected = dense_textbook(q, k, v, starts, seq_lens, 0.3)
    assert out.dtype == dtype and out.shape == expected.shape
    relative = float((out.double() - expected).abs().max() / expected.abs().max())
    assert relative <= KERNEL_EPS[dtype] * torch.finfo(dtype).eps, relative
    assert torch.equal(out[-2:], torch.zeros_like(out[-2:]))
    # the reference primitive agrees too (same meaning, another order of sums)
    torch.testing.assert_close(out, torch.ops.mla.attention(q, k, v, starts, seq_lens, 0.3),
                               **({"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}))


def test_dense_attention_schema_and_fake_kernel():
    q, k, v, starts, seq_lens = dense_batch(torch.float32, [(3, 5), (2, 2)])
    k, v = k.nan_to_num(), v.nan_to_num()
    torch.library.opcheck(torch.ops.mla_cpu.attention.default, (q, k, v, starts, seq_lens, 0.5),
                          test_utils=("test_schema", "test_faketensor"))

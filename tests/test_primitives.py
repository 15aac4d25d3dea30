"""The mla:: primitives' reference kernels against formulas written here (Hugging Face's RMSNorm,
rope as complex rotation, softmax attention one query at a time), and their cache writes byte for
byte: caches start from random contents, and every slot not written keeps them exactly."""
import pytest
import torch
from conftest import changed_rows, ulp

from mla_graph import primitives  # noqa: F401  (registers torch.ops.mla)

mla = torch.ops.mla
L, R = 12, 6   # latent and rope widths of the caches below


def _assert_within_ulps(actual: torch.Tensor, expected: torch.Tensor, ulps: float) -> None:
    """|actual - expected| <= ulps ulps of actual's dtype at |expected| (expected in float32 or
    wider), plus the float32 noise of a short reduction at the scale of the largest element."""
    diff = (actual.double() - expected.double()).abs()
    tol = ulps * ulp(expected, actual.dtype).double() + 16 * torch.finfo(torch.float32).eps * expected.abs().max()
    worst = int((diff - tol).argmax())
    assert (diff <= tol).all(), (f"element {worst}: {float(actual.flatten()[worst])} vs "
                                 f"{float(expected.flatten()[worst])}, tolerance {float(tol.flatten()[worst]):.3g}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_hugging_faces(dtype):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 3, 32, generator=gen) * 3).to(dtype)
    norm = DeepseekV3RMSNorm(32, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32, generator=gen) * 0.2 + 1)
        expected = norm(x)
    out = mla.rms_norm(x, norm.weight, 1e-6)
    assert out.dtype == dtype
    _assert_within_ulps(out, expected.float(), ulps=1)
    # eps is added to the mean square, not to the root: visible on a row of tiny values
    tiny = torch.full((1, 4), 1e-4)
    torch.testing.assert_close(mla.rms_norm(tiny, torch.ones(4), 1e-6),
                               tiny / torch.sqrt(torch.tensor(1e-8 + 1e-6)), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_rotates_interleaved_pairs_and_deinterleaves(dtype):
    """Pair (x[2i], x[2i+1]) is the complex number x[2i] + i x[2i+1], turned by the angle of row
    positions[t] of the table (cos in its first half, sin in its second); the output holds the
    real parts, then the imaginary parts."""
    gen = torch.Generator().manual_seed(1)
    T, N = 7, 3
    x = torch.randn(T, N, R, generator=gen).to(dtype)
    angles = torch.rand(40, R // 2, generator=gen) * 6
    scale = 1.07   # the table carries yarn's mscale
    table = torch.cat([angles.cos(), angles.sin()], -1) * scale
    positions = torch.tensor([0, 39, 5, 5, 17, 2, 30])
    z = torch.complex(x[..., 0::2].double(), x[..., 1::2].double())
    turned = z * torch.polar(torch.full_like(angles, scale, dtype=torch.float64), angles.double())[positions][:, None]
    expected = torch.cat([turned.real, turned.imag], -1)
    out = mla.rope(x, positions, table)
    assert out.dtype == dtype and out.shape == x.shape
    _assert_within_ulps(out, expected, ulps=1)
    # a key of one head ([T, R], as k_pe): same rotation
    _assert_within_ulps(mla.rope(x[:, 0], positions, table), expected[:, 0], ulps=1)


def _random_caches(num_blocks: int, block_size: int, dtype: torch.dtype, seed: int = 2):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(num_blocks, block_size, 1, L, generator=gen).to(dtype),
            torch.randn(num_blocks, block_size, 1, R, generator=gen).to(dtype))


def _expected_after_writes(cache: torch.Tensor, values: torch.Tensor, slots: list[int]) -> torch.Tensor:
    """What the cache must hold: row `slot` = the token's values in the cache dtype, for every
    slot but -1, one token at a time; every other row as it was."""
    expected = cache.clone()
    rows = expected.view(-1, cache.shape[-1])
    for t, slot in enumerate(slots):
        if slot != -1:
            rows[slot] = values.reshape(len(slots), -1)[t].to(cache.dtype)
    return expected


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slots", [[5, -1, 0, 13, -1, 2], [-1, -1, -1], [14, 1, -1]],
                         ids=["some-empty", "all-empty", "empty-last"])
def test_cache_write_writes_exactly_the_given_slots(slots, cache_dtype):
    """Slot -1 writes nothing. The caches' last slot (15) is written by no token: a -1 read as an
    index would land there. Every byte is compared: written rows equal the values, others unchanged."""
    latent_cache, rope_cache = _random_caches(4, 4, cache_dtype)
    before = latent_cache.clone(), rope_cache.clone()
    gen = torch.Generator().manual_seed(3)
    latent, k_pe = torch.randn(len(slots), L, generator=gen), torch.randn(len(slots), 1, R, generator=gen)
    mla.cache_write(latent, k_pe, latent_cache, rope_cache, torch.tensor(slots))
    for name, after, old, values in (("latent", latent_cache, before[0], latent),
                                     ("rope", rope_cache, before[1], k_pe)):
        wrong = changed_rows(_expected_after_writes(old, values, slots), after)
        assert not wrong, f"{name} cache slots {wrong} differ from the expected contents (written: {slots})"


def test_cache_write_into_row_strided_views_of_one_cache():
    """vLLM's one [blocks, block_size, 1, L + R] tensor, written through its latent and rope views:
    the other part of each written row, and every row not written, keep their bytes."""
    gen = torch.Generator().manual_seed(4)
    one = torch.randn(3, 4, 1, L + R, generator=gen)
    before = one.clone()
    slots = [7, -1, 0, 4]
    latent, k_pe = torch.randn(4, L, generator=gen), torch.randn(4, R, generator=gen)
    mla.cache_write(latent, k_pe, one[..., :L], one[..., L:], torch.tensor(slots))
    expected = before.clone().view(-1, L + R)
    for t, slot in enumerate(slots):
        if slot != -1:
            expected[slot] = torch.cat([latent[t], k_pe[t]])
    wrong = changed_rows(expected.view(one.shape), one)
    assert not wrong, f"slots {wrong} differ from the expected contents (written: {slots})"


def test_gather_paged_reads_each_requests_blocks_in_table_order():
    gen = torch.Generator().manual_seed(5)
    cache = torch.randn(6, 4, 1, L, generator=gen)
    table = torch.tensor([[3, 0, 5], [1, 1, 2]], dtype=torch.int32)
    out = mla.gather_paged(cache, table)
    assert out.shape == (2, 12, L)
    for b in range(2):
        for pos in range(12):
            assert torch.equal(out[b, pos], cache[table[b, pos // 4], pos % 4, 0]), (b, pos)


def _textbook_attention(q, k, v, starts, seq_lens, scale):
    """One query at a time: softmax over keys 0..(seq_len - new + i) of its request, in float64."""
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float64)
    for b, s in enumerate(seq_lens):
        new = starts[b + 1] - starts[b]
        for i in range(new):
            visible = s - new + i + 1
            for h in range(q.shape[1]):
                kh = k[b, :visible, h % k.shape[2]].double()
                vh = v[b, :visible, h % v.shape[2]].double()
                weights = torch.softmax(scale * (kh @ q[starts[b] + i, h].double()), dim=0)
                out[starts[b] + i, h] = weights @ vh
    return out


@pytest.mark.parametrize("kv_heads", [1, 3], ids=["mqa", "mha"])
def test_attention_is_causal_softmax_over_each_requests_context(kv_heads):
    gen = torch.Generator().manual_seed(6)
    N, D, Dv = 3, 10, 7
    starts, seq_lens = [0, 1, 5, 8], [9, 4, 20]   # a decode, a prefill, a chunk after 17 cached
    q = torch.randn(9, N, D, generator=gen)       # row 8 belongs to no request: padding
    k = torch.randn(3, 20, kv_heads, D, generator=gen)
    v = torch.randn(3, 20, kv_heads, Dv, generator=gen)
    out = mla.attention(q, k, v, torch.tensor(starts), torch.tensor(seq_lens), 0.3)
    expected = _textbook_attention(q, k, v, starts, seq_lens, 0.3)
    torch.testing.assert_close(out[:8], expected[:8].float())   # float32 defaults: a few eps
    assert torch.equal(out[8], torch.zeros(N, Dv))


def test_paged_attention_reads_latent_and_rope_through_the_block_table():
    """score = scale * (q . c + q_rope . k_pe), value = the latent c itself, over each request's
    own blocks only (the other blocks hold NaN: a read of them would show)."""
    gen = torch.Generator().manual_seed(7)
    N, bs = 2, 4
    latent_cache = torch.full((7, bs, 1, L), float("nan"))
    rope_cache = torch.full((7, bs, 1, R), float("nan"))
    table = torch.tensor([[5, 2, 0], [1, 0, 0]], dtype=torch.int32)   # 0: unused table padding
    seq_lens, starts = [9, 3], [0, 2, 5]
    for b, s in enumerate(seq_lens):
        for pos in range(s):
            blk = table[b, pos // bs]
            latent_cache[blk, pos % bs] = torch.randn(1, L, generator=gen)
            rope_cache[blk, pos % bs] = torch.randn(1, R, generator=gen)
    q, q_rope = torch.randn(5, N, L, generator=gen), torch.randn(5, N, R, generator=gen)
    out = mla.paged_attention(q, q_rope, latent_cache, rope_cache, table, torch.tensor(starts),
                              torch.tensor(seq_lens), 0.25)
    def context(cache, b, s):
        return torch.stack([cache[table[b, p // bs], p % bs, 0] for p in range(s)])
    ctx = [context(latent_cache, b, s) for b, s in enumerate(seq_lens)]
    ctx_rope = [context(rope_cache, b, s) for b, s in enumerate(seq_lens)]
    k = torch.zeros(2, 9, 1, L + R)
    v = torch.zeros(2, 9, 1, L)
    for b, s in enumerate(seq_lens):
        k[b, :s, 0] = torch.cat([ctx[b], ctx_rope[b]], -1)
        v[b, :s, 0] = ctx[b]
    expected = _textbook_attention(torch.cat([q, q_rope], -1), k, v, starts, seq_lens, 0.25)
    torch.testing.assert_close(out, expected.float())

"""FIA v1/v2 against torch SDPA (float32, over the same rounded inputs) over K/V gathered by hand.

Inputs are half precision, as the kernel's documented limits require (tests/npu/test_npu_limits.py);
outputs are compared within a few ulps of their dtype, lse (float32) likewise."""
import math

import pytest
import torch
import torch.nn.functional as F
from npu_tolerance import assert_ulps_close

from mla_graph.npu import ensure_npu_ops

ensure_npu_ops()
BF16 = torch.bfloat16
fia = torch.ops.npu.npu_fused_infer_attention_score
fia_v2 = torch.ops.npu.npu_fused_infer_attention_score_v2
TRIU_2048 = torch.triu(torch.ones(2048, 2048, dtype=torch.int8), diagonal=1)


def sdpa(q, k, v, keep, scale):
    """q [N,Sq,D], k/v [N,Skv,D] with KV heads already expanded; keep [Sq,Skv] bool."""
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=keep, scale=scale)[0]


def lse_of(q, k, keep, scale):
    scores = (q @ k.transpose(-1, -2)) * scale
    return torch.logsumexp(scores.masked_fill(~keep, float("-inf")), dim=-1)


def gather_paged(cache_rows, table, length, block_size):
    """cache_rows: [blocks, block_size, X]; returns the first `length` tokens [length, X]."""
    rows = []
    for t in range(length):
        rows.append(cache_rows[int(table[t // block_size]), t % block_size])
    return torch.stack(rows)


def rand(*shape, dtype=BF16):
    return torch.randn(*shape).to(dtype)


def test_bnsd_paged_decode_mla_rope_single_kv_head():
    # MLA mode within its limits: latent 512, rope 64, one KV head, 32 query heads, block size 16.
    torch.manual_seed(0)
    b, n, d, dr, bs, blocks = 2, 32, 512, 64, 16, 6
    kv_lens = [20, 5]
    q = rand(b, n, 1, d)
    q_rope = rand(b, n, 1, dr)
    ckv = rand(blocks, bs, d)  # (blocknum, blocksize, H) with N_kv = 1
    krope = rand(blocks, bs, dr)
    table = torch.tensor([[4, 1], [3, 0]], dtype=torch.int32)
    scale = 1 / math.sqrt(d + dr)
    out, lse = fia(q, ckv, ckv, query_rope=q_rope, key_rope=krope, block_table=table, actual_seq_lengths_kv=kv_lens,
                   num_heads=n, num_key_value_heads=1, scale=scale, input_layout="BNSD", block_size=bs,
                   softmax_lse_flag=True)
    assert out.shape == (b, n, 1, d) and out.dtype == BF16 and lse.shape == (b, n, 1, 1)
    for i, length in enumerate(kv_lens):
        k = gather_paged(ckv, table[i], length, bs).float()
        kr = gather_paged(krope, table[i], length, bs).float()
        qf = torch.cat([q[i], q_rope[i]], -1).float()
        kf = torch.cat([k, kr], -1).expand(n, -1, -1)
        keep = torch.ones(1, length, dtype=torch.bool)
        assert_ulps_close(out[i], sdpa(qf, kf, k.expand(n, -1, -1), keep, scale))
        assert_ulps_close(lse[i, :, :, 0], lse_of(qf, kf, keep, scale))
    # v2 with the (blocknum, KV_N, blocksize, D) cache layout computes the same thing
    out2, lse2 = fia_v2(q, ckv.unsqueeze(1), ckv.unsqueeze(1), query_rope=q_rope, key_rope=krope.unsqueeze(1),
                        block_table=table, actual_seq_kvlen=kv_lens, num_query_heads=n, num_key_value_heads=1,
                        softmax_scale=scale, input_layout="BNSD", block_size=bs)
    torch.testing.assert_close(out2, out)
    assert lse2.shape == (0,) and lse2.dtype == torch.float32


@pytest.mark.parametrize("kv_lens", [[3, 5], [6, 5]])
def test_tnd_prefill_sparse3_cumulative_lengths(kv_lens):
    # TND within its limits: bf16, 8 heads, qk 192, v 128, sparse 3 with the mask.
    torch.manual_seed(1)
    n, d, dv = 8, 192, 128
    q_lens = [3, 5]
    q = rand(sum(q_lens), n, d)
    k = rand(sum(kv_lens), n, d)
    v = rand(sum(kv_lens), n, dv)
    cum_q = torch.tensor(q_lens).cumsum(0).tolist()
    cum_kv = torch.tensor(kv_lens).cumsum(0).tolist()
    scale = 1 / math.sqrt(d)
    out, lse = fia(q, k, v, atten_mask=TRIU_2048, actual_seq_lengths=cum_q, actual_seq_lengths_kv=cum_kv,
                   num_heads=n, scale=scale, input_layout="TND", sparse_mode=3, softmax_lse_flag=True)
    assert out.shape == (sum(q_lens), n, dv) and out.dtype == BF16 and lse.shape == (sum(q_lens), n, 1)
    q0 = k0 = 0
    for ql, kl in zip(q_lens, kv_lens):
        i = torch.arange(ql)[:, None]
        j = torch.arange(kl)[None, :]
        keep = j <= i + (kl - ql)  # right-down causal
        qs, ks, vs = (t.float().transpose(0, 1) for t in (q[q0:q0 + ql], k[k0:k0 + kl], v[k0:k0 + kl]))
        assert_ulps_close(out[q0:q0 + ql].transpose(0, 1), sdpa(qs, ks, vs, keep, scale))
        assert_ulps_close(lse[q0:q0 + ql, :, 0].t(), lse_of(qs, ks, keep, scale))
        q0, k0 = q0 + ql, k0 + kl
    out_ntd, lse_ntd = fia(q, k, v, atten_mask=TRIU_2048, actual_seq_lengths=cum_q, actual_seq_lengths_kv=cum_kv,
                           num_heads=n, scale=scale, input_layout="TND_NTD", sparse_mode=3, softmax_lse_flag=True)
    torch.testing.assert_close(out_ntd, out.transpose(0, 1))
    torch.testing.assert_close(lse_ntd, lse)


def _bnsd_reference(q, k, v, n, nkv, scale, kv_lens):
    """q [B,N,S,D], k/v [B,Nkv,Skv,D]: GQA by repeating KV heads in the test."""
    outs = []
    for i, kl in enumerate(kv_lens):
        ke = k[i, :, :kl].repeat_interleave(n // nkv, 0)
        ve = v[i, :, :kl].repeat_interleave(n // nkv, 0)
        outs.append(sdpa(q[i], ke, ve, torch.ones(q.size(2), kl, dtype=torch.bool), scale))
    return torch.stack(outs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bsh_and_bsnd_gqa_non_paged(dtype):
    torch.manual_seed(2)
    b, s, n, nkv, d, skv = 2, 3, 4, 2, 8, 5
    q = rand(b, n, s, d, dtype=dtype)
    k = rand(b, nkv, skv, d, dtype=dtype)
    v = rand(b, nkv, skv, d, dtype=dtype)
    kv_lens = [5, 2]
    expected = _bnsd_reference(q.float(), k.float(), v.float(), n, nkv, 0.25, kv_lens)
    bsnd = [t.transpose(1, 2).contiguous() for t in (q, k, v)]
    out, _ = fia(*bsnd, num_heads=n, num_key_value_heads=nkv, scale=0.25, input_layout="BSND",
                 actual_seq_lengths_kv=kv_lens)
    assert out.dtype == dtype
    assert_ulps_close(out.transpose(1, 2), expected)
    bsh = [t.reshape(b, t.size(1), -1) for t in bsnd]
    out_bsh, _ = fia(*bsh, num_heads=n, num_key_value_heads=nkv, scale=0.25, input_layout="BSH",
                     actual_seq_lengths_kv=kv_lens)
    assert out_bsh.shape == (b, s, n * d)
    assert_ulps_close(out_bsh.reshape(b, s, n, d).transpose(1, 2), expected)


def test_output_forms_nbsd_and_bnsd_bsnd():
    torch.manual_seed(3)
    b, s, n, d = 2, 3, 2, 4
    q, k, v = (rand(b, n, s, d) for _ in range(3))
    expected = _bnsd_reference(q.float(), k.float(), v.float(), n, n, 0.5, [s, s])
    kwargs = dict(num_heads=n, scale=0.5)
    out, _ = fia(q, k, v, input_layout="BNSD_NBSD", **kwargs)
    assert_ulps_close(out, expected.permute(1, 0, 2, 3))
    out, _ = fia(q, k, v, input_layout="BNSD_BSND", **kwargs)
    assert_ulps_close(out, expected.transpose(1, 2))
    bsnd = [t.transpose(1, 2) for t in (q, k, v)]
    out, _ = fia(*bsnd, input_layout="BSND_NBSD", **kwargs)
    assert_ulps_close(out, expected.permute(1, 0, 2, 3))
    bsh = [t.reshape(b, s, n * d) for t in bsnd]
    out, _ = fia(*bsh, input_layout="BSH_NBSD", **kwargs)
    assert_ulps_close(out, expected.permute(1, 0, 2, 3))


def test_ntd_tnd_output_form():
    # NTD input is token-major: the TND limits apply (8 heads, qk 192, v 192).
    torch.manual_seed(4)
    n, d, t = 8, 192, 5
    q, k, v = (rand(n, t, d) for _ in range(3))
    out, _ = fia(q, k, v, actual_seq_lengths=[t], actual_seq_lengths_kv=[t], num_heads=n, input_layout="NTD_TND")
    expected = sdpa(q.float(), k.float(), v.float(), torch.ones(t, t, dtype=torch.bool), 1.0)
    assert_ulps_close(out, expected.transpose(0, 1))


def test_sparse0_mask_with_band_and_sparse2_and_fully_masked_row():
    torch.manual_seed(5)
    n, s, skv, d = 2, 4, 6, 4
    q = rand(1, n, s, d, dtype=torch.float16)
    k, v = rand(1, n, skv, d, dtype=torch.float16), rand(1, n, skv, d, dtype=torch.float16)
    qf, kf, vf = q[0].float(), k[0].float(), v[0].float()
    mask = torch.zeros(s, skv, dtype=torch.bool)
    mask[:, 5] = True
    mask[3, :] = True  # row 3 fully masked
    out, lse = fia(q, k, v, atten_mask=mask, num_heads=n, input_layout="BNSD", pre_tokens=1, next_tokens=1,
                   softmax_lse_flag=True)
    i, j = torch.arange(s)[:, None], torch.arange(skv)[None, :]
    keep = ~mask & (j >= i - 1) & (j <= i + 1)
    assert_ulps_close(out[0, :, :3], sdpa(qf, kf, vf, keep, 1.0)[:, :3])
    assert torch.count_nonzero(out[0, :, 3]) == 0
    assert torch.isneginf(lse[0, :, 3, 0]).all()
    out2, _ = fia(q, k, v, atten_mask=TRIU_2048, num_heads=n, input_layout="BNSD", sparse_mode=2)
    assert_ulps_close(out2[0], sdpa(qf, kf, vf, j <= i, 1.0))

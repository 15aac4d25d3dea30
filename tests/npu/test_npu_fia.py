"""FIA v1/v2 against torch SDPA over K/V gathered by hand from the inputs."""
import math

import pytest
import torch
import torch.nn.functional as F

from mla_graph.npu import ensure_npu_ops

ensure_npu_ops()
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


def test_bnsd_paged_decode_mla_rope_single_kv_head():
    torch.manual_seed(0)
    b, n, d, dr, bs, blocks = 2, 4, 32, 16, 16, 6
    kv_lens = [20, 5]
    q = torch.randn(b, n, 1, d)
    q_rope = torch.randn(b, n, 1, dr)
    ckv = torch.randn(blocks, bs, d)  # (blocknum, blocksize, H) with N_kv = 1
    krope = torch.randn(blocks, bs, dr)
    table = torch.tensor([[4, 1], [3, 0]], dtype=torch.int32)
    scale = 1 / math.sqrt(d + dr)
    out, lse = fia(q, ckv, ckv, query_rope=q_rope, key_rope=krope, block_table=table, actual_seq_lengths_kv=kv_lens,
                   num_heads=n, num_key_value_heads=1, scale=scale, input_layout="BNSD", block_size=bs,
                   softmax_lse_flag=True)
    assert out.shape == (b, n, 1, d) and lse.shape == (b, n, 1, 1)
    for i, length in enumerate(kv_lens):
        k = gather_paged(ckv, table[i], length, bs)
        kr = gather_paged(krope, table[i], length, bs)
        qf = torch.cat([q[i], q_rope[i]], -1)
        kf = torch.cat([k, kr], -1).expand(n, -1, -1)
        keep = torch.ones(1, length, dtype=torch.bool)
        torch.testing.assert_close(out[i], sdpa(qf, kf, k.expand(n, -1, -1), keep, scale), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[i, :, :, 0], lse_of(qf, kf, keep, scale), atol=1e-5, rtol=1e-5)
    # v2 with the (blocknum, KV_N, blocksize, D) cache layout computes the same thing
    out2, lse2 = fia_v2(q, ckv.unsqueeze(1), ckv.unsqueeze(1), query_rope=q_rope, key_rope=krope.unsqueeze(1),
                        block_table=table, actual_seq_kvlen=kv_lens, num_query_heads=n, num_key_value_heads=1,
                        softmax_scale=scale, input_layout="BNSD", block_size=bs)
    torch.testing.assert_close(out2, out)
    assert lse2.shape == (0,) and lse2.dtype == torch.float32


@pytest.mark.parametrize("kv_lens", [[3, 5], [6, 5]])
def test_tnd_prefill_sparse3_cumulative_lengths(kv_lens):
    torch.manual_seed(1)
    n, d = 2, 8
    q_lens = [3, 5]
    q = torch.randn(sum(q_lens), n, d)
    k = torch.randn(sum(kv_lens), n, d)
    v = torch.randn(sum(kv_lens), n, d)
    cum_q = torch.tensor(q_lens).cumsum(0).tolist()
    cum_kv = torch.tensor(kv_lens).cumsum(0).tolist()
    out, lse = fia(q, k, v, atten_mask=TRIU_2048, actual_seq_lengths=cum_q, actual_seq_lengths_kv=cum_kv,
                   num_heads=n, scale=0.3, input_layout="TND", sparse_mode=3, softmax_lse_flag=True)
    assert out.shape == (sum(q_lens), n, d) and lse.shape == (sum(q_lens), n, 1)
    q0 = k0 = 0
    for ql, kl in zip(q_lens, kv_lens):
        i = torch.arange(ql)[:, None]
        j = torch.arange(kl)[None, :]
        keep = j <= i + (kl - ql)  # right-down causal
        qs, ks, vs = (t.transpose(0, 1) for t in (q[q0:q0 + ql], k[k0:k0 + kl], v[k0:k0 + kl]))
        torch.testing.assert_close(out[q0:q0 + ql].transpose(0, 1), sdpa(qs, ks, vs, keep, 0.3), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[q0:q0 + ql, :, 0].t(), lse_of(qs, ks, keep, 0.3), atol=1e-5, rtol=1e-5)
        q0, k0 = q0 + ql, k0 + kl
    out_ntd, lse_ntd = fia(q, k, v, atten_mask=TRIU_2048, actual_seq_lengths=cum_q, actual_seq_lengths_kv=cum_kv,
                           num_heads=n, scale=0.3, input_layout="TND_NTD", sparse_mode=3, softmax_lse_flag=True)
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


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_bsh_and_bsnd_gqa_non_paged(dtype, tol):
    torch.manual_seed(2)
    b, s, n, nkv, d, skv = 2, 3, 4, 2, 8, 5
    q = torch.randn(b, n, s, d)
    k = torch.randn(b, nkv, skv, d)
    v = torch.randn(b, nkv, skv, d)
    kv_lens = [5, 2]
    expected = _bnsd_reference(q, k, v, n, nkv, 0.25, kv_lens)
    bsnd = [t.transpose(1, 2).contiguous().to(dtype) for t in (q, k, v)]
    out, _ = fia(*bsnd, num_heads=n, num_key_value_heads=nkv, scale=0.25, input_layout="BSND",
                 actual_seq_lengths_kv=kv_lens)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float().transpose(1, 2), expected, atol=tol, rtol=tol)
    bsh = [t.reshape(b, t.size(1), -1) for t in bsnd]
    out_bsh, _ = fia(*bsh, num_heads=n, num_key_value_heads=nkv, scale=0.25, input_layout="BSH",
                     actual_seq_lengths_kv=kv_lens)
    assert out_bsh.shape == (b, s, n * d)
    torch.testing.assert_close(out_bsh.float().reshape(b, s, n, d).transpose(1, 2), expected, atol=tol, rtol=tol)


def test_output_forms_nbsd_and_bnsd_bsnd():
    torch.manual_seed(3)
    b, s, n, d = 2, 3, 2, 4
    q, k, v = (torch.randn(b, n, s, d) for _ in range(3))
    expected = _bnsd_reference(q, k, v, n, n, 0.5, [s, s])
    kwargs = dict(num_heads=n, scale=0.5)
    out, _ = fia(q, k, v, input_layout="BNSD_NBSD", **kwargs)
    torch.testing.assert_close(out, expected.permute(1, 0, 2, 3), atol=1e-5, rtol=1e-5)
    out, _ = fia(q, k, v, input_layout="BNSD_BSND", **kwargs)
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=1e-5, rtol=1e-5)
    bsnd = [t.transpose(1, 2) for t in (q, k, v)]
    out, _ = fia(*bsnd, input_layout="BSND_NBSD", **kwargs)
    torch.testing.assert_close(out, expected.permute(1, 0, 2, 3), atol=1e-5, rtol=1e-5)
    bsh = [t.reshape(b, s, n * d) for t in bsnd]
    out, _ = fia(*bsh, input_layout="BSH_NBSD", **kwargs)
    torch.testing.assert_close(out, expected.permute(1, 0, 2, 3), atol=1e-5, rtol=1e-5)


def test_ntd_tnd_output_form():
    torch.manual_seed(4)
    n, d, t = 2, 4, 5
    q, k, v = (torch.randn(n, t, d) for _ in range(3))
    out, _ = fia(q, k, v, actual_seq_lengths=[t], actual_seq_lengths_kv=[t], num_heads=n, input_layout="NTD_TND")
    expected = sdpa(q, k, v, torch.ones(t, t, dtype=torch.bool), 1.0)
    torch.testing.assert_close(out, expected.transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_sparse0_mask_with_band_and_sparse2_and_fully_masked_row():
    torch.manual_seed(5)
    n, s, skv, d = 2, 4, 6, 4
    q = torch.randn(1, n, s, d)
    k, v = torch.randn(1, n, skv, d), torch.randn(1, n, skv, d)
    mask = torch.zeros(s, skv, dtype=torch.bool)
    mask[:, 5] = True
    mask[3, :] = True  # row 3 fully masked
    out, lse = fia(q, k, v, atten_mask=mask, num_heads=n, input_layout="BNSD", pre_tokens=1, next_tokens=1,
                   softmax_lse_flag=True)
    i, j = torch.arange(s)[:, None], torch.arange(skv)[None, :]
    keep = ~mask & (j >= i - 1) & (j <= i + 1)
    torch.testing.assert_close(out[0, :, :3], sdpa(q[0], k[0], v[0], keep, 1.0)[:, :3], atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(out[0, :, 3]) == 0
    assert torch.isneginf(lse[0, :, 3, 0]).all()
    out2, _ = fia(q, k, v, atten_mask=TRIU_2048, num_heads=n, input_layout="BNSD", sparse_mode=2)
    torch.testing.assert_close(out2[0], sdpa(q[0], k[0], v[0], j <= i, 1.0), atol=1e-5, rtol=1e-5)

"""atb paged_attention_mla and ring_mla against SDPA over hand-gathered K/V."""
import torch
import torch.nn.functional as F

from mla_graph.npu import ensure_npu_ops

ensure_npu_ops()
atb = torch.ops.atb


def test_paged_attention_mla_decode():
    torch.manual_seed(0)
    b, n, dk, dv, bs = 2, 4, 24, 16, 4
    query = torch.randn(b, n, dk)
    key_cache = torch.randn(5, bs, 1, dk)
    table = torch.tensor([[3, 0, 4], [1, 2, 0]], dtype=torch.int32)
    lens = torch.tensor([10, 6], dtype=torch.int32)
    out = torch.zeros(b, n, dv)
    assert atb._npu_paged_attention_mla(query, key_cache, 1, n, 0.2, table, lens, dv, out) is None
    for i in range(b):
        rows = torch.stack([key_cache[int(table[i, t // bs]), t % bs, 0] for t in range(int(lens[i]))])
        expected = F.scaled_dot_product_attention(query[i][:, None], rows.expand(n, -1, -1),
                                                  rows[:, :dv].expand(n, -1, -1), scale=0.2)[:, 0]
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=1e-5)


def test_ring_mla_merge_of_two_chunks_equals_attention_over_concatenation():
    torch.manual_seed(1)
    n, d, dr = 2, 8, 4
    q_lens, prefix_lens = [3, 2], [4, 1]
    tq, tp = sum(q_lens), sum(prefix_lens)
    q_nope, q_rope = torch.randn(tq, n, d), torch.randn(tq, n, dr)
    cur = [torch.randn(tq, n, x) for x in (d, dr, d)]  # k_nope, k_rope, value of the new tokens
    pre = [torch.randn(tp, n, x) for x in (d, dr, d)]  # same for the cached prefix chunk
    mask = torch.triu(torch.ones(512, 512), 1)
    scale = 0.3
    out1, lse1 = atb.npu_ring_mla(q_nope, q_rope, *cur, mask, torch.tensor(q_lens), n, n, qk_scale=scale,
                                  kernel_type="kernel_type_high_precision", mask_type="mask_type_triu",
                                  input_layout="type_bsnd", calc_type="calc_type_first_ring")
    assert out1.shape == (tq, n, d) and lse1.shape == (n, tq) and lse1.dtype == torch.float32
    out2, lse2 = atb.npu_ring_mla(q_nope, q_rope, *pre, mask, torch.tensor([q_lens, prefix_lens]), n, n,
                                  pre_out=out1, prev_lse=lse1, qk_scale=scale, mask_type="no_mask",
                                  input_layout="type_bsnd", calc_type="calc_type_default")
    q0 = p0 = 0
    for ql, pl in zip(q_lens, prefix_lens):
        qs = torch.cat([q_nope[q0:q0 + ql], q_rope[q0:q0 + ql]], -1).transpose(0, 1)
        keys = torch.cat([torch.cat(pre[:2], -1)[p0:p0 + pl], torch.cat(cur[:2], -1)[q0:q0 + ql]]).transpose(0, 1)
        values = torch.cat([pre[2][p0:p0 + pl], cur[2][q0:q0 + ql]]).transpose(0, 1)
        i, j = torch.arange(ql)[:, None], torch.arange(pl + ql)[None, :]
        keep = j < pl + i + 1  # whole prefix, then causal over the new tokens
        expected = F.scaled_dot_product_attention(qs, keys, values, attn_mask=keep, scale=scale)
        torch.testing.assert_close(out2[q0:q0 + ql].transpose(0, 1), expected, atol=1e-5, rtol=1e-5)
        scores = (qs @ keys.transpose(1, 2) * scale).masked_fill(~keep, float("-inf"))
        torch.testing.assert_close(lse2[:, q0:q0 + ql], torch.logsumexp(scores, -1), atol=1e-5, rtol=1e-5)
        q0, p0 = q0 + ql, p0 + pl

"""npu_interleave_rope against complex rotation, npu_rms_norm against its formula,
npu_mla_prolog_v3 against a step-by-step computation written here."""
import torch

from mla_graph.npu import ensure_npu_ops

ensure_npu_ops()
npu = torch.ops.npu


def test_interleave_rope_is_complex_rotation_of_pairs():
    torch.manual_seed(0)
    b, n, s, d = 2, 3, 4, 8
    x = torch.randn(b, n, s, d)
    theta = torch.rand(b, 1, s, d // 2) * 6
    cos = torch.cat([theta.cos(), theta.cos()], -1)
    sin = torch.cat([theta.sin(), theta.sin()], -1)
    rotated = torch.complex(x[..., 0::2], x[..., 1::2]) * torch.polar(torch.ones_like(theta), theta)
    expected = torch.cat([rotated.real, rotated.imag], -1)
    torch.testing.assert_close(npu.npu_interleave_rope(x, cos, sin), expected)


def test_rms_norm_formula_and_rstd_shape():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 4, 5)
    gamma = torch.randn(4, 5)
    y, rstd = npu.npu_rms_norm(x, gamma, 1e-3)
    exp_rstd = 1 / torch.sqrt(x.pow(2).mean(dim=(-2, -1), keepdim=True) + 1e-3)
    assert rstd.shape == (2, 3, 1, 1) and rstd.dtype == torch.float32
    torch.testing.assert_close(rstd, exp_rstd)
    torch.testing.assert_close(y, x * exp_rstd * gamma)
    y16, _ = npu.npu_rms_norm(x.half(), gamma.half(), 1e-3)
    assert y16.dtype == torch.float16
    torch.testing.assert_close(y16.float(), x * exp_rstd * gamma, atol=1e-2, rtol=1e-2)


def _rope_pairs(x, cos, sin):
    """Interleaved-pair rotation written as complex multiplication (output de-interleaved)."""
    half = x.size(-1) // 2
    z = torch.complex(x[..., 0::2], x[..., 1::2]) * torch.complex(cos[..., :half], sin[..., :half])
    return torch.cat([z.real, z.imag], -1)


def test_mla_prolog_v3_step_by_step():
    torch.manual_seed(2)
    t, he, hcq, n, d, dr, hckv, bs = 3, 32, 16, 2, 8, 4, 12, 4
    x = torch.randn(t, he)
    w_dq, w_uq_qr = torch.randn(he, hcq) / 4, torch.randn(hcq, n * (d + dr)) / 4
    w_uk, w_dkv_kr = torch.randn(n, d, hckv) / 4, torch.randn(he, hckv + dr) / 4
    g_cq, g_ckv = torch.rand(hcq) + 0.5, torch.rand(hckv) + 0.5
    theta = torch.rand(t, dr // 2)
    cos, sin = torch.cat([theta.cos()] * 2, -1), torch.cat([theta.sin()] * 2, -1)
    kv_cache, kr_cache = torch.zeros(2, bs, 1, hckv), torch.zeros(2, bs, 1, dr)
    index = torch.tensor([6, -1, 1])
    query, query_rope, dq_nope, q_norm, dq_norm = npu.npu_mla_prolog_v3(
        x, w_dq, w_uq_qr, w_uk, w_dkv_kr, g_cq, g_ckv, sin, cos, kv_cache, kr_cache, cache_index=index,
        query_norm_flag=True)

    def rms(v, g):
        return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5) * g
    c_q = rms(x @ w_dq, g_cq)
    q = (c_q @ w_uq_qr).reshape(t, n, d + dr)
    exp_query = torch.stack([torch.stack([q[i, h, :d] @ w_uk[h] for h in range(n)]) for i in range(t)])
    exp_qrope = _rope_pairs(q[..., d:], cos[:, None], sin[:, None])
    assert query.dtype == torch.bfloat16 and query_rope.dtype == torch.bfloat16
    torch.testing.assert_close(query.float(), exp_query, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(query_rope.float(), exp_qrope, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(q_norm, c_q)
    assert dq_nope.shape == (0,) and dq_norm.shape == (0,)
    kv = x @ w_dkv_kr
    exp_ckv, exp_kr = rms(kv[:, :hckv], g_ckv), _rope_pairs(kv[:, hckv:], cos, sin)
    torch.testing.assert_close(kv_cache.reshape(-1, hckv)[6], exp_ckv[0])
    torch.testing.assert_close(kv_cache.reshape(-1, hckv)[1], exp_ckv[2])
    torch.testing.assert_close(kr_cache.reshape(-1, dr)[6], exp_kr[0])
    assert kv_cache.reshape(-1, hckv)[[0, 2, 3, 4, 5, 7]].abs().sum() == 0
    fresh_kv, fresh_kr = torch.zeros_like(kv_cache), torch.zeros_like(kr_cache)
    outs = npu.npu_mla_prolog_v3_functional(x, w_dq, w_uq_qr, w_uk, w_dkv_kr, g_cq, g_ckv, sin, cos, fresh_kv,
                                            fresh_kr, cache_index=index)
    assert len(outs) == 7 and fresh_kv.abs().sum() == 0
    torch.testing.assert_close(outs[5], kv_cache)
    torch.testing.assert_close(outs[6], kr_cache)
    torch.testing.assert_close(outs[0], query)
    assert outs[3].shape == (0,) and outs[3].dtype == w_uq_qr.dtype

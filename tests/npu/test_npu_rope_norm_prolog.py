"""npu_interleave_rope against complex rotation, npu_rms_norm against its formula,
npu_mla_prolog_v3 against a step-by-step computation written here."""
import torch
from npu_tolerance import assert_rounded_once
from prolog_args import PrologDims, prolog_args

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
    a = prolog_args(PrologDims(), seed=2)
    d = PrologDims()
    n, dn, hckv, dr = d.heads, d.nope, d.latent, d.rope
    kv_before, kr_before = a["kv_cache"].clone(), a["kr_cache"].clone()
    query, query_rope, dq_nope, q_norm, dq_norm = npu.npu_mla_prolog_v3(**a, query_norm_flag=True)

    f = {k: v.float() for k, v in a.items() if v.is_floating_point()}

    def rms(v, g):
        return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5) * g
    x, cos, sin = f["token_x"], f["rope_cos"], f["rope_sin"]
    c_q = rms(x @ f["weight_dq"], f["rmsnorm_gamma_cq"])
    q = (c_q @ f["weight_uq_qr"]).reshape(d.tokens, n, dn + dr)
    exp_query = torch.stack([torch.stack([q[i, h, :dn] @ f["weight_uk"][h] for h in range(n)])
                             for i in range(d.tokens)])
    exp_qrope = _rope_pairs(q[..., dn:], cos[:, None], sin[:, None])
    assert query.dtype == torch.bfloat16 and query_rope.dtype == torch.bfloat16
    # every output is the float32 computation rounded once to bfloat16: half an ulp, plus float32
    # noise of the longest chain of sums (hidden, then q_lora, then nope)
    chain = d.hidden + d.q_lora + d.nope
    assert_rounded_once(query, exp_query, terms=chain)
    assert_rounded_once(query_rope, exp_qrope, terms=chain)
    assert q_norm.dtype == a["weight_uq_qr"].dtype
    assert_rounded_once(q_norm, c_q, terms=d.hidden + d.q_lora)
    assert dq_nope.shape == (0,) and dq_norm.shape == (0,)
    kv = x @ f["weight_dkv_kr"]
    exp_ckv, exp_kr = rms(kv[:, :hckv], f["rmsnorm_gamma_ckv"]), _rope_pairs(kv[:, hckv:], cos, sin)
    slots = a["cache_index"]
    assert_rounded_once(a["kv_cache"].reshape(-1, hckv)[slots], exp_ckv, terms=d.hidden + d.latent)
    assert_rounded_once(a["kr_cache"].reshape(-1, dr)[slots], exp_kr, terms=d.hidden)
    untouched = torch.ones(d.blocks * d.block_size, dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(a["kv_cache"].reshape(-1, hckv)[untouched], kv_before.reshape(-1, hckv)[untouched])
    assert torch.equal(a["kr_cache"].reshape(-1, dr)[untouched], kr_before.reshape(-1, dr)[untouched])
    written_kv, written_kr = a["kv_cache"], a["kr_cache"]
    kv_in, kr_in = kv_before.clone(), kr_before.clone()
    outs = npu.npu_mla_prolog_v3_functional(**{**a, "kv_cache": kv_in, "kr_cache": kr_in})
    assert len(outs) == 7 and torch.equal(kv_in, kv_before) and torch.equal(kr_in, kr_before)
    assert torch.equal(outs[5], written_kv) and torch.equal(outs[6], written_kr)
    assert torch.equal(outs[0], query)
    assert outs[3].shape == (0,) and outs[3].dtype == a["weight_uq_qr"].dtype

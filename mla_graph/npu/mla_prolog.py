"""npu_mla_prolog_v3 and _v3_functional (non-quantised, cache_mode PA_BSND).

    c_Q        = RmsNorm(x W_dq; gamma_cq)                    [T, Hcq]
    qc, qr     = split((c_Q W_uq_qr).view(T, N, D + Dr), [D, Dr])
    query      = einsum('tnd,ndc->tnc', qc, W_uk)              [T, N, Hckv]
    query_rope = ROPE(qr)                                      [T, N, Dr]
    ckv, kr    = split(x W_dkv_kr, [Hckv, Dr])
    kv_cache.view(-1, 1, Hckv)[cache_index[t]] = RmsNorm(ckv; gamma_ckv)
    kr_cache.view(-1, 1, Dr)[cache_index[t]]   = ROPE(kr)

ROPE is the interleaved form of npu_interleave_rope / npu_kv_rmsnorm_rope_cache:
the wheel does not state the variant, and the cache written here must match the
one npu_kv_rmsnorm_rope_cache writes for the same model. Everything is computed
in float32; query and query_rope are bfloat16 as META declares.

Calls outside the op's documented limits are rejected (limits.mla_prolog): the dims of
DeepSeek-V3 (He 7168/7680/6144, Hcq 1536, Hckv 512, D 128, Dr 64), block size 16 or 128,
weight_dq/weight_uq_qr/weight_dkv_kr cast to FRACTAL_NZ (npu_format_cast(w, 29); only the
format is recorded, the data stays in ND order), cache_index within the cache.
"""
from __future__ import annotations

import torch

from mla_graph.npu import limits
from mla_graph.npu._checks import reject_given, require
from mla_graph.npu.formats import npu_format
from mla_graph.npu.rope_norm import interleave_rope_fp32, rms_norm_fp32

V3 = "npu_mla_prolog_v3"


def _check(op: str, a: dict, with_data: bool) -> None:
    """Ranks, then what the emulation does not model, then the documented limits; `with_data`
    (the reference kernel) adds the limits that read values: weight formats and cache_index."""
    x, w_uk, sin, kv_cache = a["token_x"], a["weight_uk"], a["rope_sin"], a["kv_cache"]
    require(x.dim() in (2, 3), op, "token_x", tuple(x.shape), "2-D [T, He] or 3-D [B, S, He]")
    require(w_uk.dim() == 3, op, "weight_uk", tuple(w_uk.shape), "3-D [N, D, Hckv]")
    require(sin.dim() == x.dim(), op, "rope_sin", tuple(sin.shape), f"{x.dim()}-D like token_x")
    require(kv_cache.dim() == 4, op, "kv_cache", tuple(kv_cache.shape), "4-D [BlockNum, BlockSize, Nkv, Hckv]")
    reject_given(op, **{k: a[k] for k in ("dequant_scale_x", "dequant_scale_w_dq", "dequant_scale_w_uq_qr",
                                          "dequant_scale_w_dkv_kr", "quant_scale_ckv", "quant_scale_ckr",
                                          "smooth_scales_cq", "actual_seq_len", "k_nope_clip_alpha")})
    for mode in ("weight_quant_mode", "kv_cache_quant_mode", "query_quant_mode", "ckvkr_repo_mode",
                 "quant_scale_repo_mode"):
        require(a[mode] == 0, op, mode, a[mode], "0 (quantised modes are not emulated)")
    for factor in ("qc_qr_scale", "kc_scale"):
        require(a[factor] == 1.0, op, factor, a[factor], "1.0 (scaling is not emulated)")
    data = {}
    if with_data:
        data = dict(weight_formats={w: npu_format(a[w]) for w in limits.PROLOG_NZ_WEIGHTS},
                    cache_index=a["cache_index"], cache_slots=kv_cache.size(0) * kv_cache.size(1))
    heads, nope, latent = w_uk.shape
    limits.enforce(limits.mla_prolog(
        token_dtype=x.dtype, hidden=x.size(-1), q_lora=a["weight_dq"].size(-1), heads=heads, latent=latent,
        nope=nope, rope=sin.size(-1), block_size=kv_cache.size(1), cache_mode=a["cache_mode"], op=op, **data))
    require(a["cache_mode"] == "PA_BSND", op, "cache_mode", a["cache_mode"], "'PA_BSND' (ND paged caches)")
    require(a["cache_index"] is not None, op, "cache_index", None, "flat slot ids for cache_mode 'PA_BSND'")


def _fake(a: dict) -> tuple[torch.Tensor, ...]:
    """META's shapes for the non-quantised case on CANN >= 8.5.0.alpha003 ([0] placeholders)."""
    x, w_uk = a["token_x"], a["weight_uk"]
    lead = list(x.shape[:-1])
    query = x.new_empty(lead + [w_uk.size(0), w_uk.size(2)], dtype=torch.bfloat16)
    query_rope = x.new_empty(lead + [w_uk.size(0), a["rope_sin"].size(-1)], dtype=torch.bfloat16)
    placeholder = x.new_empty([0], dtype=torch.float32)
    norm_shape = lead + [a["weight_dq"].size(1)] if a["query_norm_flag"] else [0]
    query_norm = x.new_empty(norm_shape, dtype=a["weight_uq_qr"].dtype)
    return query, query_rope, placeholder, query_norm, x.new_empty([0], dtype=torch.float32)


def _compute(a: dict) -> tuple[torch.Tensor, ...]:
    op = a["op"]
    x_in, w_uk = a["token_x"], a["weight_uk"]
    outs = _fake(a)
    heads, d_nope, h_ckv = w_uk.shape
    d_rope = a["rope_sin"].size(-1)
    x = x_in.reshape(-1, x_in.size(-1)).float()
    tokens = x.size(0)
    if tokens == 0:
        return outs
    require(a["weight_uq_qr"].size(1) == heads * (d_nope + d_rope), op, "weight_uq_qr",
            tuple(a["weight_uq_qr"].shape), f"[Hcq, N*(D+Dr)] = [.., {heads * (d_nope + d_rope)}]")
    require(a["weight_dkv_kr"].size(1) == h_ckv + d_rope, op, "weight_dkv_kr", tuple(a["weight_dkv_kr"].shape),
            f"[He, Hckv+Dr] = [.., {h_ckv + d_rope}]")
    cos = a["rope_cos"].reshape(tokens, d_rope).float()
    sin = a["rope_sin"].reshape(tokens, d_rope).float()
    c_q = rms_norm_fp32(x @ a["weight_dq"].float(), a["rmsnorm_gamma_cq"], a["rmsnorm_epsilon_cq"])
    q = (c_q @ a["weight_uq_qr"].float()).view(tokens, heads, d_nope + d_rope)
    query = torch.einsum("tnd,ndc->tnc", q[..., :d_nope], w_uk.float())
    query_rope = interleave_rope_fp32(q[..., d_nope:], cos[:, None], sin[:, None])
    ckv_kr = x @ a["weight_dkv_kr"].float()
    ckv = rms_norm_fp32(ckv_kr[:, :h_ckv], a["rmsnorm_gamma_ckv"], a["rmsnorm_epsilon_ckv"])
    kr = interleave_rope_fp32(ckv_kr[:, h_ckv:], cos, sin)
    slots = a["cache_index"].reshape(-1).long()
    require(slots.numel() == tokens, op, "cache_index", tuple(a["cache_index"].shape), f"{tokens} slot ids")
    blocks = tuple(a["kv_cache"].shape[:2])
    for arg, cache, rows in (("kv_cache", a["kv_cache"], ckv), ("kr_cache", a["kr_cache"], kr)):
        require(tuple(cache.shape) == (*blocks, 1, rows.size(1)) and cache.is_contiguous(), op, arg,
                tuple(cache.shape), f"a contiguous [{blocks[0]}, {blocks[1]}, 1, {rows.size(1)}] cache")
        cache.view(-1, rows.size(1))[slots] = rows.to(cache.dtype)
    outs[0].copy_(query.reshape(outs[0].shape))
    outs[1].copy_(query_rope.reshape(outs[1].shape))
    if a["query_norm_flag"]:
        outs[3].copy_(c_q.reshape(outs[3].shape))
    return outs


def _args(op, with_data, token_x, weight_dq, weight_uq_qr, weight_uk, weight_dkv_kr, rmsnorm_gamma_cq,
          rmsnorm_gamma_ckv, rope_sin, rope_cos, kv_cache, kr_cache, *, cache_index=None, dequant_scale_x=None,
          dequant_scale_w_dq=None, dequant_scale_w_uq_qr=None, dequant_scale_w_dkv_kr=None, quant_scale_ckv=None,
          quant_scale_ckr=None, smooth_scales_cq=None, actual_seq_len=None, k_nope_clip_alpha=None,
          rmsnorm_epsilon_cq=1e-05, rmsnorm_epsilon_ckv=1e-05, cache_mode="PA_BSND", query_norm_flag=False,
          weight_quant_mode=0, kv_cache_quant_mode=0, query_quant_mode=0, ckvkr_repo_mode=0,
          quant_scale_repo_mode=0, tile_size=128, qc_qr_scale=1.0, kc_scale=1.0, token_x_dtype=None,
          weight_dq_dtype=None, weight_uq_qr_dtype=None, weight_dkv_kr_dtype=None, kv_cache_dtype=None) -> dict:
    a = dict(locals())
    _check(op, a, with_data)
    return a


def mla_prolog_v3(*args, **kwargs) -> tuple[torch.Tensor, ...]:
    return _compute(_args(V3, True, *args, **kwargs))


def mla_prolog_v3_fake(*args, **kwargs) -> tuple[torch.Tensor, ...]:
    return _fake(_args(V3, False, *args, **kwargs))


def mla_prolog_v3_functional(*args, **kwargs) -> tuple[torch.Tensor, ...]:
    a = _args(f"{V3}_functional", True, *args, **kwargs)
    a["kv_cache"], a["kr_cache"] = a["kv_cache"].clone(), a["kr_cache"].clone()
    return (*_compute(a), a["kv_cache"], a["kr_cache"])


def mla_prolog_v3_functional_fake(*args, **kwargs) -> tuple[torch.Tensor, ...]:
    a = _args(f"{V3}_functional", False, *args, **kwargs)
    return (*_fake(a), torch.empty_like(a["kv_cache"]), torch.empty_like(a["kr_cache"]))


KERNELS = {
    f"npu::{V3}": (mla_prolog_v3, mla_prolog_v3_fake),
    f"npu::{V3}_functional": (mla_prolog_v3_functional, mla_prolog_v3_functional_fake),
}

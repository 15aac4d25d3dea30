"""npu_kv_rmsnorm_rope_cache, _v2 and _v2_functional.

kv [B, N, S, Dn+Dr] splits into the RMSNorm part (Dn = gamma size) and the
rope part (Dr = cos.size(3)); c_kv = RMSNorm(kv[..., :Dn]) * gamma and
k_rope = interleaved RoPE of kv[..., Dn:], both computed in float32. They are
scattered into ckv_cache / k_cache according to cache_mode; an index of -1
writes nothing. v1 carries no alias annotation, so (as a graph op must) it
returns updated copies of the caches and leaves its inputs alone.
"""
from __future__ import annotations

import torch

from mla_graph.npu._checks import reject, reject_given, require
from mla_graph.npu.rope_norm import interleave_rope_fp32, rms_norm_fp32

CACHE_MODES = ("Norm", "PA", "PA_BNSD", "PA_BLK_BNSD")
NOT_EMULATED_MODES = ("PA_NZ", "PA_BLK_NZ")


def _check(op: str, kv, gamma, cos, sin, k_cache, ckv_cache, k_rope_scale, c_kv_scale, k_rope_offset,
           c_kv_offset, v, cache_mode) -> None:
    require(kv.dim() == 4, op, "kv", tuple(kv.shape), "a 4-D [B, N, S, Dn+Dr] tensor")
    require(gamma.dim() == 1, op, "gamma", tuple(gamma.shape), "a 1-D [Dn] tensor")
    require(cos.dim() == 4, op, "cos", tuple(cos.shape), "a 4-D [B, 1, S, Dr] tensor")
    reject_given(op, v=v, k_rope_scale=k_rope_scale, c_kv_scale=c_kv_scale, k_rope_offset=k_rope_offset,
                 c_kv_offset=c_kv_offset)
    require(kv.size(3) == gamma.size(0) + cos.size(3), op, "kv", tuple(kv.shape),
            f"last dim gamma.size(0) + cos.size(3) = {gamma.size(0) + cos.size(3)}")
    for arg, cache in (("k_cache", k_cache), ("ckv_cache", ckv_cache)):
        require(cache.dtype.is_floating_point, op, arg, cache.dtype,
                "a floating-point cache (int8 quantised caches are not emulated)")
    if cache_mode in NOT_EMULATED_MODES:
        reject(op, "cache_mode", cache_mode, f"one of {CACHE_MODES} (FRACTAL_NZ caches are not emulated)")
    require(cache_mode in CACHE_MODES, op, "cache_mode", cache_mode, f"one of {CACHE_MODES}")


def _outputs_fake(kv, gamma, cos) -> tuple[torch.Tensor, torch.Tensor]:
    lead = list(kv.shape[:3])
    return kv.new_empty(lead + [cos.size(3)]), kv.new_empty(lead + [gamma.size(0)])


def _compute(kv, gamma, cos, sin, epsilon) -> tuple[torch.Tensor, torch.Tensor]:
    dn = gamma.size(0)
    c_kv = rms_norm_fp32(kv[..., :dn], gamma, epsilon).to(kv.dtype)
    k_rope = interleave_rope_fp32(kv[..., dn:], cos, sin).to(kv.dtype)
    return k_rope, c_kv


def _slot_rows(op: str, arg: str, cache: torch.Tensor, d: int) -> torch.Tensor:
    """The paged cache as [slots, d] rows, a view (never a copy): the kernel writes the cache it is
    given. Rows may be strided, e.g. the latent or rope part of vLLM's one
    [blocks, block_size, 1, latent + rope] cache; only unit stride within a row and slots that
    flatten to one axis are needed."""
    require(cache.dim() >= 2 and cache.size(-1) == d and cache.stride(-1) == 1, op, arg,
            (tuple(cache.shape), cache.stride()), f"a paged cache with last dim {d} of unit stride")
    try:
        return cache.view(-1, d)
    except RuntimeError:
        reject(op, arg, (tuple(cache.shape), cache.stride()),
               "a paged cache whose [blocks, block_size, N] axes flatten to one slot axis "
               "(blocks of consecutive rows)")


def _write(op: str, cache: torch.Tensor, arg: str, values: torch.Tensor, index: torch.Tensor, mode: str) -> None:
    """Scatter values [B, N, S, D] into cache in place."""
    b, n, s, d = values.shape
    if mode == "Norm":
        require(index.shape == (b, s), op, "index", tuple(index.shape), f"[B, S] = {(b, s)} for cache_mode='Norm'")
        require(cache.dim() == 4 and cache.size(0) == b and cache.size(1) == n and cache.size(3) == d, op, arg,
                tuple(cache.shape), f"[B={b}, N={n}, Lmax, D={d}] for cache_mode='Norm'")
        for bi, si in (index >= 0).nonzero().tolist():
            pos = int(index[bi, si])
            require(pos < cache.size(2), op, "index", pos, f"a position below Lmax={cache.size(2)} or -1")
            cache[bi, :, pos] = values[bi, :, si].to(cache.dtype)
        return
    require(n == 1, op, "kv", tuple(values.shape), f"N = 1 for paged cache_mode={mode!r}")
    flat = _slot_rows(op, arg, cache, d)
    tokens = values.reshape(b * s, d)
    if mode == "PA_BLK_BNSD":
        block = cache.numel() // (cache.size(0) * d)  # N = 1, so this is the block size for BSND or BNSD
        blocks_per_batch = -(-s // block)
        require(index.numel() == b * blocks_per_batch, op, "index", tuple(index.shape),
                f"B * ceil(S / block_size) = {b * blocks_per_batch} block start slots")
        starts = index.reshape(b, blocks_per_batch).long()
        pos = torch.arange(s)
        first = starts[:, pos // block]
        slots = torch.where(first >= 0, first + pos % block, torch.full_like(first, -1)).reshape(-1)
    else:
        require(index.numel() == b * s, op, "index", tuple(index.shape), f"B * S = {b * s} slot ids")
        slots = index.reshape(-1).long()
    live = slots >= 0
    require(bool((slots[live] < flat.size(0)).all()), op, "index", slots[live].max().item() if live.any() else -1,
            f"slots below {flat.size(0)} (blocks * block_size) or -1")
    flat[slots[live]] = tokens[live].to(cache.dtype)


def kv_rmsnorm_rope_cache(kv, gamma, cos, sin, index, k_cache, ckv_cache, *, k_rope_scale=None, c_kv_scale=None,
                          k_rope_offset=None, c_kv_offset=None, v=None, epsilon=1e-5, cache_mode="Norm",
                          is_output_kv=False) -> tuple[torch.Tensor, ...]:
    op = "npu_kv_rmsnorm_rope_cache"
    _check(op, kv, gamma, cos, sin, k_cache, ckv_cache, k_rope_scale, c_kv_scale, k_rope_offset, c_kv_offset, v,
           cache_mode)
    k_rope, c_kv = _compute(kv, gamma, cos, sin, epsilon)
    k_new, ckv_new = k_cache.clone(), ckv_cache.clone()
    _write(op, k_new, "k_cache", k_rope, index, cache_mode)
    _write(op, ckv_new, "ckv_cache", c_kv, index, cache_mode)
    return k_new, ckv_new, k_rope, c_kv


def kv_rmsnorm_rope_cache_fake(kv, gamma, cos, sin, index, k_cache, ckv_cache, *, k_rope_scale=None,
                               c_kv_scale=None, k_rope_offset=None, c_kv_offset=None, v=None, epsilon=1e-5,
                               cache_mode="Norm", is_output_kv=False) -> tuple[torch.Tensor, ...]:
    _check("npu_kv_rmsnorm_rope_cache", kv, gamma, cos, sin, k_cache, ckv_cache, k_rope_scale, c_kv_scale,
           k_rope_offset, c_kv_offset, v, cache_mode)
    return (torch.empty_like(k_cache), torch.empty_like(ckv_cache), *_outputs_fake(kv, gamma, cos))


def kv_rmsnorm_rope_cache_v2(kv, gamma, cos, sin, index, k_cache, ckv_cache, *, k_rope_scale=None,
                             c_kv_scale=None, k_rope_offset=None, c_kv_offset=None, v=None, epsilon=1e-5,
                             cache_mode="Norm", is_output_kv=False, k_cache_dtype=None,
                             ckv_cache_dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    op = "npu_kv_rmsnorm_rope_cache_v2"
    _check(op, kv, gamma, cos, sin, k_cache, ckv_cache, k_rope_scale, c_kv_scale, k_rope_offset, c_kv_offset, v,
           cache_mode)
    k_rope, c_kv = _compute(kv, gamma, cos, sin, epsilon)
    _write(op, k_cache, "k_cache", k_rope, index, cache_mode)
    _write(op, ckv_cache, "ckv_cache", c_kv, index, cache_mode)
    return k_rope, c_kv


def kv_rmsnorm_rope_cache_v2_fake(kv, gamma, cos, sin, index, k_cache, ckv_cache, *, k_rope_scale=None,
                                  c_kv_scale=None, k_rope_offset=None, c_kv_offset=None, v=None, epsilon=1e-5,
                                  cache_mode="Norm", is_output_kv=False, k_cache_dtype=None,
                                  ckv_cache_dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    _check("npu_kv_rmsnorm_rope_cache_v2", kv, gamma, cos, sin, k_cache, ckv_cache, k_rope_scale, c_kv_scale,
           k_rope_offset, c_kv_offset, v, cache_mode)
    return _outputs_fake(kv, gamma, cos)


def kv_rmsnorm_rope_cache_v2_functional(kv, gamma, cos, sin, index, k_cache, ckv_cache, **kwargs
                                        ) -> tuple[torch.Tensor, ...]:
    k_new, ckv_new = k_cache.clone(), ckv_cache.clone()
    k_rope, c_kv = kv_rmsnorm_rope_cache_v2(kv, gamma, cos, sin, index, k_new, ckv_new, **kwargs)
    return k_rope, c_kv, k_new, ckv_new


def kv_rmsnorm_rope_cache_v2_functional_fake(kv, gamma, cos, sin, index, k_cache, ckv_cache, **kwargs
                                             ) -> tuple[torch.Tensor, ...]:
    k_rope, c_kv = kv_rmsnorm_rope_cache_v2_fake(kv, gamma, cos, sin, index, k_cache, ckv_cache, **kwargs)
    return k_rope, c_kv, torch.empty_like(k_cache), torch.empty_like(ckv_cache)


KERNELS = {
    "npu::npu_kv_rmsnorm_rope_cache": (kv_rmsnorm_rope_cache, kv_rmsnorm_rope_cache_fake),
    "npu::npu_kv_rmsnorm_rope_cache_v2": (kv_rmsnorm_rope_cache_v2, kv_rmsnorm_rope_cache_v2_fake),
    "npu::npu_kv_rmsnorm_rope_cache_v2_functional": (kv_rmsnorm_rope_cache_v2_functional,
                                                     kv_rmsnorm_rope_cache_v2_functional_fake),
}

"""The `mla::` primitives: what aten cannot say cleanly, each with a reference and a fake kernel.

Kept to five. Everything else in the definition is aten.

- `mla::rms_norm(x, weight, eps)`           Hugging Face's DeepseekV3RMSNorm, fp32 inside
- `mla::rope(x, positions, cos_sin)`        DeepSeek's interleaved rope; output de-interleaved
- `mla::cache_write(latent, k_pe, latent_cache!, rope_cache!, slot_mapping)`
                                            paged write, slot -1 writes nothing
- `mla::gather_paged(cache, block_table)`   [B, max_blocks*block_size, D] view of each request
- `mla::attention(q, k, v, query_start_loc, seq_lens, scale)`
                                            ragged attention, causal within the new tokens
- `mla::paged_attention(q, q_rope, latent_cache, rope_cache, block_table, query_start_loc, seq_lens, scale)`
                                            latent-space MQA read straight from the paged cache
                                            (v = latent); made by the absorb and page passes
"""
from __future__ import annotations

import torch

_lib = torch.library.Library("mla", "DEF")

_lib.define("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor")
_lib.define("rope(Tensor x, Tensor positions, Tensor cos_sin) -> Tensor")
_lib.define("cache_write(Tensor latent, Tensor k_pe, Tensor(a!) latent_cache, Tensor(b!) rope_cache, "
            "Tensor slot_mapping) -> ()")
_lib.define("gather_paged(Tensor cache, Tensor block_table) -> Tensor")
_lib.define("attention(Tensor q, Tensor k, Tensor v, Tensor query_start_loc, Tensor seq_lens, "
            "float scale) -> Tensor")


_lib.define("paged_attention(Tensor q, Tensor q_rope, Tensor latent_cache, Tensor rope_cache, "
            "Tensor block_table, Tensor query_start_loc, Tensor seq_lens, float scale) -> Tensor")


def _impl(name: str):
    def register(fn):
        _lib.impl(name, fn, "CompositeExplicitAutograd")
        return fn
    return register


def _fake(name: str):
    return torch.library.register_fake(f"mla::{name}", lib=_lib)


# ---- rms_norm -------------------------------------------------------------------------
@_impl("rms_norm")
def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


@_fake("rms_norm")
def _rms_norm_fake(x, weight, eps):
    return torch.empty_like(x, dtype=torch.promote_types(x.dtype, weight.dtype))


# ---- rope ------------------------------------------------------------------------------
@_impl("rope")
def rope_ref(x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """x [T, ..., R] in DeepSeek's interleaved pair layout; returns the rotated pairs de-interleaved:
    out = cat(x0*cos - x1*sin, x1*cos + x0*sin) with x0 = x[..., 0::2], x1 = x[..., 1::2]."""
    half = x.shape[-1] // 2
    rows = cos_sin[positions.long()]
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (half,)
    cos, sin = rows[:, :half].reshape(shape), rows[:, half:].reshape(shape)
    xf = x.float()
    x0, x1 = xf[..., 0::2], xf[..., 1::2]
    return torch.cat([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).to(x.dtype)


@_fake("rope")
def _rope_fake(x, positions, cos_sin):
    return torch.empty_like(x)


# ---- cache_write -----------------------------------------------------------------------
@_impl("cache_write")
def cache_write_ref(latent: torch.Tensor, k_pe: torch.Tensor, latent_cache: torch.Tensor,
                    rope_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    latent_cache.view(-1, latent_cache.shape[-1])[slots] = latent.reshape(-1, latent_cache.shape[-1])[keep].to(latent_cache.dtype)
    rope_cache.view(-1, rope_cache.shape[-1])[slots] = k_pe.reshape(-1, rope_cache.shape[-1])[keep].to(rope_cache.dtype)


@_fake("cache_write")
def _cache_write_fake(latent, k_pe, latent_cache, rope_cache, slot_mapping):
    return None


# ---- gather_paged ----------------------------------------------------------------------
@_impl("gather_paged")
def gather_paged_ref(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """cache [num_blocks, block_size, 1, D], block_table [B, max_blocks] -> [B, max_blocks*block_size, D]."""
    gathered = cache[block_table.long()]  # [B, MB, BS, 1, D]
    return gathered.reshape(block_table.shape[0], -1, cache.shape[-1])


@_fake("gather_paged")
def _gather_paged_fake(cache, block_table):
    return cache.new_empty(block_table.shape[0], block_table.shape[1] * cache.shape[1], cache.shape[-1])


# ---- attention ---------------------------------------------------------------------------
@_impl("attention")
def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_start_loc: torch.Tensor,
                  seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [T, N, Dq]; k [B, S, Nk, Dq]; v [B, S, Nk, Dv] with Nk in {1, N}.

    Request b owns query rows query_start_loc[b]:query_start_loc[b+1] and keys 0:seq_lens[b];
    its t new tokens are the last t of its context, so query i sees keys j <= i + seq_len - t.
    Rows owned by no request (padding) are zero. Computed in float32.
    """
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    starts = query_start_loc.tolist()
    for b, seq_len in enumerate(seq_lens.tolist()):
        t0, t1 = starts[b], starts[b + 1]
        if t1 == t0:
            continue
        qb = q[t0:t1].float()
        kb = k[b, :seq_len].float().expand(seq_len, q.shape[1], k.shape[-1])
        vb = v[b, :seq_len].float().expand(seq_len, q.shape[1], v.shape[-1])
        scores = torch.einsum("tnd,snd->nts", qb, kb) * scale
        t = t1 - t0
        i = torch.arange(t).unsqueeze(1)
        j = torch.arange(seq_len).unsqueeze(0)
        scores.masked_fill_(j > i + (seq_len - t), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[t0:t1] = torch.einsum("nts,snd->tnd", probs, vb).to(out.dtype)
    return out


@_fake("attention")
def _attention_fake(q, k, v, query_start_loc, seq_lens, scale):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[-1])


# ---- paged_attention -----------------------------------------------------------------------
@_impl("paged_attention")
def paged_attention_ref(q: torch.Tensor, q_rope: torch.Tensor, latent_cache: torch.Tensor,
                        rope_cache: torch.Tensor, block_table: torch.Tensor, query_start_loc: torch.Tensor,
                        seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [T, N, L], q_rope [T, N, R]; one latent head: score = scale*(q.c + q_rope.k_pe), out = p.c.
    Reads only each request's own blocks. Causal within the new tokens, as mla::attention."""
    out = q.new_zeros(q.shape)
    bs, width = latent_cache.shape[1], latent_cache.shape[-1]
    starts = query_start_loc.tolist()
    for b, seq_len in enumerate(seq_lens.tolist()):
        t0, t1 = starts[b], starts[b + 1]
        if t1 == t0:
            continue
        blocks = block_table[b, : -(-seq_len // bs)].long()
        c = latent_cache[blocks].reshape(-1, width)[:seq_len].float()
        kr = rope_cache[blocks].reshape(-1, rope_cache.shape[-1])[:seq_len].float()
        scores = (torch.einsum("tnl,sl->nts", q[t0:t1].float(), c)
                  + torch.einsum("tnr,sr->nts", q_rope[t0:t1].float(), kr)) * scale
        t = t1 - t0
        causal = torch.arange(seq_len).unsqueeze(0) > torch.arange(t).unsqueeze(1) + (seq_len - t)
        scores.masked_fill_(causal, float("-inf"))
        out[t0:t1] = torch.einsum("nts,sl->tnl", torch.softmax(scores, -1), c).to(out.dtype)
    return out


@_fake("paged_attention")
def _paged_attention_fake(q, q_rope, latent_cache, rope_cache, block_table, query_start_loc, seq_lens, scale):
    return torch.empty_like(q)


ops = torch.ops.mla

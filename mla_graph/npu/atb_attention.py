"""atb::_npu_paged_attention_mla (MLA decode) and atb::npu_ring_mla (chunked prefill).

ATB has no Python meta; the fakes here follow the shapes the callers allocate:
paged_attention_mla writes its `out` argument and returns nothing, ring_mla
returns out [qT, N, Dv] in q_nope's dtype and lse [N, qT] in float32.
"""
from __future__ import annotations

import torch

from mla_graph.npu._checks import reject, require
from mla_graph.npu.softmax import attend

PA_MLA = "_npu_paged_attention_mla"
RING = "npu_ring_mla"
RING_MASKS = (None, "no_mask", "mask_type_triu")
RING_KERNELS = (None, "kernel_type_default", "kernel_type_high_precision")
RING_CALCS = (None, "calc_type_default", "calc_type_first_ring")


def paged_attention_mla(query: torch.Tensor, key_cache: torch.Tensor, num_kv_heads: int, num_heads: int,
                        scale_value: float, block_table: torch.Tensor, context_lens: torch.Tensor,
                        mla_vheadsize: int, out: torch.Tensor) -> None:
    """One query token per sequence: out[b] = softmax(scale q_b K_b^T) V_b, where K_b is
    the 576-wide cache rows of sequence b and V_b their first mla_vheadsize columns."""
    batch = context_lens.numel()
    require(query.dim() == 3 and query.size(0) == batch and query.size(1) == num_heads, PA_MLA, "query",
            tuple(query.shape), f"[B={batch}, num_heads={num_heads}, D]")
    require(key_cache.dim() == 4 and key_cache.size(2) == num_kv_heads and key_cache.size(3) == query.size(2),
            PA_MLA, "key_cache", tuple(key_cache.shape),
            f"ND [blocks, block_size, num_kv_heads={num_kv_heads}, {query.size(2)}]")
    require(num_kv_heads > 0 and num_heads % num_kv_heads == 0, PA_MLA, "num_kv_heads", num_kv_heads,
            f"a positive divisor of num_heads={num_heads}")
    require(0 < mla_vheadsize <= query.size(2), PA_MLA, "mla_vheadsize", mla_vheadsize,
            f"1..{query.size(2)} (V is the leading columns of the cache)")
    require(tuple(out.shape) == (batch, num_heads, mla_vheadsize), PA_MLA, "out", tuple(out.shape),
            f"{(batch, num_heads, mla_vheadsize)}")
    block = key_cache.size(1)
    group = num_heads // num_kv_heads
    table = block_table.long()
    for b, length in enumerate(context_lens.reshape(-1).tolist()):
        require(length <= table.size(1) * block, PA_MLA, "context_lens", length,
                f"at most block_table.size(1) * block_size = {table.size(1) * block}")
        pos = torch.arange(length)
        keys = key_cache[table[b, pos // block], pos % block].transpose(0, 1).float()  # [Nkv, L, D]
        keys = keys.repeat_interleave(group, 0)
        scores = (query[b].float().unsqueeze(1) @ keys.transpose(1, 2)) * scale_value  # [N, 1, L]
        result, _ = attend(scores, torch.ones(1, length, dtype=torch.bool), keys[..., :mla_vheadsize])
        out[b] = result.squeeze(1).to(out.dtype)


def paged_attention_mla_fake(query, key_cache, num_kv_heads, num_heads, scale_value, block_table, context_lens,
                             mla_vheadsize, out) -> None:
    return None


def _ring_check(q_nope, k_nope, value, seqlen, head_num, kv_head_num, pre_out, prev_lse, kernel_type, mask_type,
                input_layout, calc_type) -> None:
    require(q_nope.dim() == 3 and q_nope.size(1) == head_num, RING, "q_nope", tuple(q_nope.shape),
            f"token-major [T, head_num={head_num}, D]")
    require(k_nope.dim() == 3 and k_nope.size(1) == kv_head_num, RING, "k_nope", tuple(k_nope.shape),
            f"token-major [T, kv_head_num={kv_head_num}, D]")
    require(kv_head_num > 0 and head_num % kv_head_num == 0, RING, "kv_head_num", kv_head_num,
            f"a positive divisor of head_num={head_num}")
    require(seqlen.dim() in (1, 2) and (seqlen.dim() == 1 or seqlen.size(0) == 2), RING, "seqlen",
            tuple(seqlen.shape), "[B] (q and kv lengths equal) or [2, B] (q lengths, kv lengths)")
    require(mask_type in RING_MASKS, RING, "mask_type", mask_type, f"one of {RING_MASKS}")
    require(kernel_type in RING_KERNELS, RING, "kernel_type", kernel_type, f"one of {RING_KERNELS}")
    require(input_layout in (None, "type_bsnd"), RING, "input_layout", input_layout,
            "None or 'type_bsnd' (token-major [T, N, D])")
    require(calc_type in RING_CALCS, RING, "calc_type", calc_type, f"one of {RING_CALCS}")
    if calc_type != "calc_type_first_ring":
        if pre_out is None or prev_lse is None:
            reject(RING, "pre_out" if pre_out is None else "prev_lse", None,
                   "a tensor for calc_type_default, which merges into the previous chunk's result")
        require(tuple(pre_out.shape) == (q_nope.size(0), head_num, value.size(2)), RING, "pre_out",
                tuple(pre_out.shape), f"{(q_nope.size(0), head_num, value.size(2))}")
        require(tuple(prev_lse.shape) == (head_num, q_nope.size(0)), RING, "prev_lse", tuple(prev_lse.shape),
                f"{(head_num, q_nope.size(0))}")


def ring_mla(q_nope: torch.Tensor, q_rope: torch.Tensor, k_nope: torch.Tensor, k_rope: torch.Tensor,
             value: torch.Tensor, mask: torch.Tensor, seqlen: torch.Tensor, head_num: int, kv_head_num: int, *,
             pre_out: torch.Tensor | None = None, prev_lse: torch.Tensor | None = None, qk_scale: float = 1.0,
             kernel_type: str | None = None, mask_type: str | None = None, input_layout: str | None = None,
             calc_type: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each sequence's query tokens over its KV chunk, then, unless this is
    the first ring, an LSE merge with (pre_out, prev_lse). The mask tensor's contents are
    not read: mask_type decides (triu = causal aligned to the chunk ends, j <= i + kv - q)."""
    _ring_check(q_nope, k_nope, value, seqlen, head_num, kv_head_num, pre_out, prev_lse, kernel_type,
                mask_type, input_layout, calc_type)
    q_lens, kv_lens = (seqlen.tolist(), seqlen.tolist()) if seqlen.dim() == 1 else seqlen.tolist()
    require(sum(q_lens) == q_nope.size(0) and sum(kv_lens) == k_nope.size(0), RING, "seqlen", seqlen.tolist(),
            f"lengths summing to q tokens {q_nope.size(0)} and kv tokens {k_nope.size(0)}")
    group = head_num // kv_head_num
    out = torch.zeros(q_nope.size(0), head_num, value.size(2))
    lse = torch.full((head_num, q_nope.size(0)), float("-inf"))
    q0 = k0 = 0
    for ql, kl in zip(q_lens, kv_lens):
        q_part = slice(q0, q0 + ql)
        kv_part = slice(k0, k0 + kl)

        def heads(t: torch.Tensor, part: slice, rep: int) -> torch.Tensor:
            return t[part].transpose(0, 1).float().repeat_interleave(rep, 0)
        scores = heads(q_nope, q_part, 1) @ heads(k_nope, kv_part, group).transpose(1, 2)
        scores = (scores + heads(q_rope, q_part, 1) @ heads(k_rope, kv_part, group).transpose(1, 2)) * qk_scale
        keep = torch.ones(ql, kl, dtype=torch.bool)
        if mask_type == "mask_type_triu":
            keep = torch.arange(kl).unsqueeze(0) <= torch.arange(ql).unsqueeze(1) + (kl - ql)
        part_out, part_lse = attend(scores, keep, heads(value, kv_part, group))
        out[q_part] = part_out.transpose(0, 1)
        lse[:, q_part] = part_lse
        q0, k0 = q0 + ql, k0 + kl
    if calc_type != "calc_type_first_ring":
        merged = torch.logaddexp(prev_lse.float(), lse)
        w_prev = torch.exp(prev_lse.float() - merged).nan_to_num(0.0).t().unsqueeze(-1)
        w_cur = torch.exp(lse - merged).nan_to_num(0.0).t().unsqueeze(-1)
        out, lse = w_prev * pre_out.float() + w_cur * out, merged
    return out.to(q_nope.dtype), lse


def ring_mla_fake(q_nope, q_rope, k_nope, k_rope, value, mask, seqlen, head_num, kv_head_num, *, pre_out=None,
                  prev_lse=None, qk_scale=1.0, kernel_type=None, mask_type=None, input_layout=None,
                  calc_type=None) -> tuple[torch.Tensor, torch.Tensor]:
    _ring_check(q_nope, k_nope, value, seqlen, head_num, kv_head_num, pre_out, prev_lse, kernel_type, mask_type,
                input_layout, calc_type)
    return (q_nope.new_empty([q_nope.size(0), head_num, value.size(2)]),
            q_nope.new_empty([head_num, q_nope.size(0)], dtype=torch.float32))


KERNELS = {
    f"atb::{PA_MLA}": (paged_attention_mla, paged_attention_mla_fake),
    f"atb::{RING}": (ring_mla, ring_mla_fake),
}

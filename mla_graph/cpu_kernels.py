"""CPU kernels the `cpu` target's lowering emits (`mla_cpu::` ops, a kernel and a fake kernel each).

- `mla_cpu::attention(q, k, v, query_start_loc, seq_lens, scale)`
      the meaning of `mla::attention` (the decompressed form: per-head K/V of each request's context,
      causal within its new tokens, rows owned by no request zero), per request as blocks of
      QUERY_BLOCK query rows, each over the keys it may see only:

          s = baddbmm(causal_bias, q_rows, k[:, :visible]^T, alpha=scale)   # [N, rows, visible] float32
          o = softmax(s) @ v[:, :visible]

      Scale and mask ride in the GEMM (no separate passes over the score matrix), and the keys past
      a block's last visible one are never multiplied: about 40% of a long prompt's causal score
      matrix at 1,000 tokens. Float32 throughout, as mla::attention and vLLM's CPU prefill compute.

- `mla_cpu::paged_attention(q, q_rope, latent_cache, rope_cache, block_table, query_start_loc, seq_lens, scale)`
      the meaning of `mla::paged_attention` (latent-space MQA straight from the paged cache, causal
      within each request's new tokens, rows owned by no request zero), computed per request as
      two GEMMs over the request's own blocks:

          c  = latent_cache.index_select(0, blocks)[:seq_len]      # [S, L]   only this request's blocks
          kr = rope_cache.index_select(0, blocks)[:seq_len]        # [S, R]
          s  = scale * (c @ q^T + kr @ q_rope^T)                   # [S, t*N] float32 (t new tokens, N heads)
          o  = softmax(causal(s)^T, dim=-1) @ c                    # [t*N, L]

Why this shape of kernel (measured on a 2-core AVX-512 VM, DeepSeek-V2-Lite dims, batch 8, 4k
context, blocks in shuffled order: ~17 ms in bf16 and ~24 ms in fp32 against ~45 / ~55 ms for the
reference primitive):
- one request at a time: its keys are the request's own ceil(seq_len / block_size) blocks, so a
  ragged batch does no work on padding, needs no length mask and reads no slot past its context.
  One batched gather of every block-table row instead allocates [B, max_blocks * block_size, L]
  per call (35 MiB in bf16 there), above glibc's 32 MiB mmap threshold, so every call pays fresh
  page faults (~13 ms of that size's ~30 ms gather + bmm). For the same reason the gathered blocks
  go into one buffer per call, reused by every request.
- keys as the GEMM's tall side (c @ q^T: [S, L] x [L, t*N]) ran ~1.5x faster than q @ c^T.
- scores in float32 for every model dtype, as the reference does: a bf16 GEMM writes bf16, rounding
  each score to 8 bits (0.2% of the largest score, ~2% of the attention output at V2-Lite dims), which
  Hugging Face's sdpa (float32 accumulators) does not do. bf16 keys are converted KEY_CHUNK at a time
  into a float32 buffer that stays in cache while its GEMM reads it (converting a whole request's
  keys at once made the float32 copy travel through memory: ~1.6x slower). The probabilities then
  meet the latent in the model dtype (one GEMM with float32 accumulation, as the CPU
  flash-attention kernel does).
- not torch's SDPA: with one latent head and 16 query rows it measured 5-10x slower than two GEMMs
  (per request and batched alike) on this host.
"""
from __future__ import annotations

import torch

KEY_CHUNK = 1024
QUERY_BLOCK = 256

_lib = torch.library.Library("mla_cpu", "DEF")
_lib.define("attention(Tensor q, Tensor k, Tensor v, Tensor query_start_loc, Tensor seq_lens, float scale) -> Tensor")
_lib.define("paged_attention(Tensor q, Tensor q_rope, Tensor latent_cache, Tensor rope_cache, "
            "Tensor block_table, Tensor query_start_loc, Tensor seq_lens, float scale) -> Tensor")


@torch.library.impl(_lib, "attention", "CompositeExplicitAutograd")
def attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_start_loc: torch.Tensor,
                  seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [T, N, Dq]; k [B, S, Nk, Dq]; v [B, S, Nk, Dv] with Nk in {1, N}; request b owns query rows
    query_start_loc[b]:query_start_loc[b+1] and keys 0:seq_lens[b], its t new tokens the last t of
    its context (query i sees keys j <= i + seq_len - t). Returns [T, N, Dv] in q's dtype."""
    T, N, Dq = q.shape
    out = q.new_zeros(T, N, v.shape[-1])
    starts = query_start_loc.tolist()
    for b, seq_len in enumerate(seq_lens.tolist()):
        t0, t1 = starts[b], starts[b + 1]
        t = t1 - t0
        if t == 0:
            continue
        keys = k[b, :seq_len].float().permute(1, 2, 0).expand(N, Dq, seq_len)      # [N, Dq, S]
        values = v[b, :seq_len].float().transpose(0, 1).expand(N, seq_len, v.shape[-1])   # [N, S, Dv]
        queries = q[t0:t1].float().transpose(0, 1)                                  # [N, t, Dq]
        for r0 in range(0, t, QUERY_BLOCK):
            r1 = min(t, r0 + QUERY_BLOCK)
            visible = r1 + seq_len - t               # keys the block's last row sees
            hidden = torch.arange(visible).view(1, -1) > torch.arange(r0, r1).view(-1, 1) + (seq_len - t)
            bias = torch.zeros(r1 - r0, visible).masked_fill_(hidden, float("-inf"))
            scores = torch.baddbmm(bias, queries[:, r0:r1], keys[:, :, :visible], alpha=scale)
            probs = torch.softmax(scores, dim=-1)
            out[t0 + r0:t0 + r1] = torch.bmm(probs, values[:, :visible]).transpose(0, 1)
    return out


@torch.library.register_fake("mla_cpu::attention", lib=_lib)
def _attention_fake(q, k, v, query_start_loc, seq_lens, scale):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[-1])


@torch.library.impl(_lib, "paged_attention", "CompositeExplicitAutograd")
def paged_attention_cpu(q: torch.Tensor, q_rope: torch.Tensor, latent_cache: torch.Tensor,
                        rope_cache: torch.Tensor, block_table: torch.Tensor, query_start_loc: torch.Tensor,
                        seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [T, N, L], q_rope [T, N, R]; caches [num_blocks, block_size, 1, L | R] (rows may be strided);
    block_table [B, max_blocks]; request b owns query rows query_start_loc[b]:query_start_loc[b+1] and
    keys 0:seq_lens[b]. Returns [T, N, L] in q's dtype."""
    T, N, L = q.shape
    R = q_rope.shape[-1]
    block_size = latent_cache.shape[1]
    out = q.new_zeros(T, N, L)
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    table = block_table.long()
    longest = -(-max(lens, default=0) // block_size)
    # one buffer per cache for the whole call, reused by every request: fresh multi-MiB allocations
    # per request cost page faults that took as long as the copies themselves
    c_all = latent_cache.new_empty(longest, block_size, 1, L)
    kr_all = rope_cache.new_empty(longest, block_size, 1, R)
    convert = latent_cache.dtype != torch.float32
    # bf16 keys are converted KEY_CHUNK at a time into one float32 buffer that stays in cache
    chunk_f32 = q.new_empty(KEY_CHUNK, L, dtype=torch.float32) if convert else None
    for b, seq_len in enumerate(lens):
        t0, t1 = starts[b], starts[b + 1]
        if t1 == t0:
            continue
        t, rows, nb = t1 - t0, (t1 - t0) * N, -(-seq_len // block_size)
        blocks = table[b, :nb]
        c = torch.index_select(latent_cache, 0, blocks, out=c_all[:nb]).view(-1, L)[:seq_len]   # [S, L]
        kr = torch.index_select(rope_cache, 0, blocks, out=kr_all[:nb]).view(-1, R)[:seq_len]   # [S, R]
        q_t = q[t0:t1].reshape(rows, L).float().t()                                            # [L, t*N]
        scores = torch.mm(kr.float(), q_rope[t0:t1].reshape(rows, R).float().t())              # [S, t*N]
        if convert:
            for k0 in range(0, seq_len, KEY_CHUNK):
                keys = c[k0:k0 + KEY_CHUNK]
                scores[k0:k0 + KEY_CHUNK].addmm_(chunk_f32[:keys.shape[0]].copy_(keys), q_t)
        else:
            scores.addmm_(c, q_t)
        scores.mul_(scale)
        if t > 1:   # query i (of t) sees keys j <= i + seq_len - t
            hidden = torch.arange(seq_len).view(-1, 1) > torch.arange(t).view(1, -1) + (seq_len - t)
            scores.view(seq_len, t, N).masked_fill_(hidden.unsqueeze(-1), float("-inf"))
        # along the keys as the last dim of the transposed view: softmax over dim 0 of [S, t*N] takes
        # ~5-10x as long once torch runs more than one thread (measured ~100 us a call at 1k keys)
        probs = torch.softmax(scores.t(), dim=-1)                                              # [t*N, S]
        torch.mm(probs.to(c.dtype), c, out=out[t0:t1].view(rows, L))
    return out


@torch.library.register_fake("mla_cpu::paged_attention", lib=_lib)
def _paged_attention_fake(q, q_rope, latent_cache, rope_cache, block_table, query_start_loc, seq_lens, scale):
    return torch.empty_like(q)


ops = torch.ops.mla_cpu

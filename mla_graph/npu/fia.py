"""Reference and fake kernels of fused infer attention (FIA v1 and v2 share them).

Per batch b and query head h (KV head h // (N/N_kv)):
    out = softmax(scale * (q k^T + q_rope k_rope^T) + pse_shift, masked) v
computed in float32 and cast to the query dtype. Fully masked rows and padded
query rows (beyond actual_seq_lengths) are written as zeros; their lse is -inf
(fully masked) or 0 (padding), since the kernel does not define either.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mla_graph.npu import fia_layout as L
from mla_graph.npu import fia_limits
from mla_graph.npu._checks import reject, require
from mla_graph.npu.softmax import attend

MAX_TOKENS = 2147483647
SPARSE_MODES = (0, 1, 2, 3, 4)
MAX_GQA_RATIO = 64
# MLA mode (query_rope/key_rope) runs one latent KV head for up to 128 query heads (DeepSeek-V3
# at TP 1: CANN's MLA documentation lists query heads 1..128); the 64 cap is for plain GQA.
MAX_MLA_RATIO = 128
MAX_BLOCK_SIZE = 512


@dataclass
class FiaCall:
    """One FIA call with v1/v2 argument names unified; `names` maps the unified
    name to the caller's spelling so errors name the argument the user passed."""
    op: str
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    query_rope: torch.Tensor | None
    key_rope: torch.Tensor | None
    pse_shift: torch.Tensor | None
    atten_mask: torch.Tensor | None
    q_lens: list[int] | None
    kv_lens: list[int] | None
    block_table: torch.Tensor | None
    num_heads: int
    num_kv_heads: int
    scale: float
    pre_tokens: int
    next_tokens: int
    input_layout: str
    sparse_mode: int
    block_size: int
    lse_flag: bool
    names: dict[str, str] = field(default_factory=dict)

    def name(self, arg: str) -> str:
        return self.names.get(arg, arg)


def validate(c: FiaCall) -> tuple[L.Layout, int]:
    """The shape-level checks the real kernel makes, then its documented limits (fia_limits);
    returns (layout, N_kv)."""
    require(c.num_heads > 0, c.op, c.name("num_heads"), c.num_heads, "a positive head count")
    layout = L.parse_layout(c.op, c.input_layout, c.query)
    nkv = c.num_kv_heads or c.num_heads
    require(nkv > 0 and c.num_heads % nkv == 0, c.op, "num_key_value_heads", c.num_kv_heads,
            f"0 or a divisor of {c.name('num_heads')}={c.num_heads}")
    max_ratio = MAX_MLA_RATIO if c.query_rope is not None else MAX_GQA_RATIO
    require(c.num_heads // nkv <= max_ratio, c.op, "num_key_value_heads", c.num_kv_heads,
            f"a value giving {c.name('num_heads')}/num_key_value_heads <= {max_ratio}")
    if not layout.token_major and layout.query != "BSH":
        heads = L.query_bsnd(c.query, layout.query, c.num_heads)[2]
        require(heads == c.num_heads, c.op, c.name("num_heads"), c.num_heads,
                f"the query's head count {heads} for layout {layout.query}")
    require(c.sparse_mode in SPARSE_MODES, c.op, "sparse_mode", c.sparse_mode,
            f"one of {SPARSE_MODES} (5-9 are not emulated)")
    require(c.query_rope is None or c.key_rope is not None, c.op, "key_rope", None,
            "a tensor whenever query_rope is given (MLA passes both)")
    require(c.key_rope is None or c.query_rope is not None, c.op, "query_rope", None,
            "a tensor whenever key_rope is given (MLA passes both)")
    if layout.token_major:
        require(c.q_lens is not None, c.op, c.name("actual_seq_lengths"), None,
                f"cumulative per-batch query ends for input_layout={c.input_layout!r}")
    if c.block_table is not None:
        require(c.kv_lens is not None, c.op, c.name("actual_seq_lengths_kv"), None,
                "per-batch KV lengths when block_table (paged KV) is given")
        multiple = 16 if c.query.dtype in (torch.float16, torch.bfloat16) else 1
        require(0 < c.block_size <= MAX_BLOCK_SIZE and c.block_size % multiple == 0, c.op, "block_size",
                c.block_size, f"0 < block_size <= {MAX_BLOCK_SIZE}, a multiple of {multiple} for "
                f"{c.query.dtype} with paged KV")
    fia_limits.enforce(c, layout, nkv)
    return layout, nkv


def fake(c: FiaCall) -> tuple[torch.Tensor, torch.Tensor]:
    layout, nkv = validate(c)
    value_d = L.value_head_dim(c.op, c.value, c.query, layout, c.block_table is not None, nkv)
    out_shape, lse_shape = L.output_shapes(c.query, layout, c.num_heads, value_d, c.lse_flag)
    return c.query.new_empty(out_shape), c.query.new_empty(lse_shape, dtype=torch.float32)


def reference(c: FiaCall) -> tuple[torch.Tensor, torch.Tensor]:
    layout, nkv = validate(c)
    out, lse = fake(c)
    if c.query.numel() == 0:   # "query empty: return at once" (op docs, constraints L8154)
        return out, lse
    batches = _batches(c, layout, nkv)
    results = [_attend(c, *batch) for batch in batches]
    dv = results[0][0].size(-1) if results else out.size(-1)
    if layout.token_major:
        t, n, _ = L.query_tnd(c.query, layout.query)
        full = torch.zeros((t, n, dv))
        full_lse = torch.zeros((t, n, 1))
        ends = list(c.q_lens or [])
        for b, (o, s) in enumerate(results):
            start = ends[b - 1] if b else 0
            full[start:ends[b]] = o.transpose(0, 1)
            full_lse[start:ends[b], :, 0] = s.transpose(0, 1)
        out.copy_(L.from_tnd(full, layout.out))
    else:
        b_, s_, n, _ = L.query_bsnd(c.query, layout.query, c.num_heads)
        full = torch.zeros((b_, n, s_, dv))
        full_lse = torch.zeros((b_, n, s_, 1))
        for b, (o, s) in enumerate(results):
            full[b, :, :o.size(1)] = o
            full_lse[b, :, :o.size(1), 0] = s
        out.copy_(L.from_bnsd(full, layout.out))
    if c.lse_flag:
        lse.copy_(full_lse)
    return out, lse


Batch = tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


def _lengths(c: FiaCall, arg: str, given: list[int] | None, batch: int, full: int) -> list[int]:
    """Per-batch lengths: a 1-list is broadcast, a longer one truncated to B."""
    if given is None:
        return [full] * batch
    require(len(given) > 0, c.op, c.name(arg), given, "a non-empty list")
    lens = list(given) * batch if len(given) == 1 else list(given[:batch])
    require(len(lens) == batch and all(0 <= n <= full for n in lens), c.op, c.name(arg), given,
            f"{batch} lengths within 0..{full}")
    return lens


def _cumulative(c: FiaCall, arg: str, ends: list[int], total: int) -> list[tuple[int, int]]:
    spans, start = [], 0
    for end in ends:
        require(start <= end <= total, c.op, c.name(arg), ends,
                f"non-decreasing cumulative ends no larger than {total}")
        spans.append((start, end))
        start = end
    return spans


def _batches(c: FiaCall, layout: L.Layout, nkv: int) -> list[Batch]:
    """Per batch: (index, q [N,Sq,D], k [Nkv,Skv,Dk], v [Nkv,Skv,Dv], q_rope, k_rope)."""
    if layout.token_major:
        q_tnd = L.to_tnd(c.query, layout.query)
        q_spans = _cumulative(c, "actual_seq_lengths", list(c.q_lens or []), q_tnd.size(0))
        qs = [q_tnd[a:e].transpose(0, 1) for a, e in q_spans]
        qr_tnd = None if c.query_rope is None else L.to_tnd(c.query_rope, layout.query)
        qrs = [None if qr_tnd is None else qr_tnd[a:e].transpose(0, 1) for a, e in q_spans]
    else:
        q_bnsd = L.to_bnsd(c.query, layout.query, c.num_heads)
        single = q_bnsd.size(2) == 1  # actual_seq_lengths is ignored for Q_S == 1
        q_lens = _lengths(c, "actual_seq_lengths", None if single else c.q_lens, q_bnsd.size(0), q_bnsd.size(2))
        qs = [q_bnsd[b, :, :n] for b, n in enumerate(q_lens)]
        qr = None if c.query_rope is None else L.to_bnsd(c.query_rope, layout.query, c.num_heads)
        qrs = [None if qr is None else qr[b, :, :n] for b, n in enumerate(q_lens)]
    ks, vs, krs = _kv(c, layout, nkv, len(qs))
    return [(b, qs[b], ks[b], vs[b], qrs[b], krs[b]) for b in range(len(qs))]


def _kv(c: FiaCall, layout: L.Layout, nkv: int, batch: int) -> tuple[list, list, list]:
    if c.block_table is not None:
        lens = _lengths(c, "actual_seq_lengths_kv", c.kv_lens, batch, MAX_TOKENS)
        gather = [_paged(c, layout, arg, t, nkv, lens) if t is not None else None
                  for arg, t in (("key", c.key), ("value", c.value), ("key_rope", c.key_rope))]
        return gather[0], gather[1], gather[2] or [None] * batch
    if layout.token_major:
        require(c.kv_lens is not None, c.op, c.name("actual_seq_lengths_kv"), None,
                f"cumulative per-batch KV ends for input_layout={c.input_layout!r} without paging")
        spans = _cumulative(c, "actual_seq_lengths_kv", list(c.kv_lens or [])[:batch],
                            L.to_tnd(c.key, layout.query).size(0))
        require(len(spans) == batch, c.op, c.name("actual_seq_lengths_kv"), c.kv_lens, f"{batch} entries")

        def split(t: torch.Tensor | None) -> list:
            return [None] * batch if t is None else [L.to_tnd(t, layout.query)[a:e].transpose(0, 1) for a, e in spans]
        return split(c.key), split(c.value), split(c.key_rope)
    k = L.to_bnsd(c.key, layout.query, nkv)
    require(k.size(0) == batch and k.size(1) == nkv, c.op, "key", tuple(c.key.shape),
            f"batch {batch} and {nkv} KV heads in layout {layout.query}")
    lens = _lengths(c, "actual_seq_lengths_kv", c.kv_lens, batch, k.size(2))

    def cut(t: torch.Tensor | None) -> list:
        return [None] * batch if t is None else [L.to_bnsd(t, layout.query, nkv)[b, :, :n] for b, n in enumerate(lens)]
    return cut(c.key), cut(c.value), cut(c.key_rope)


def _paged(c: FiaCall, layout: L.Layout, arg: str, cache: torch.Tensor, nkv: int,
           lens: list[int]) -> list[torch.Tensor]:
    """Gather each batch's first lens[b] tokens from a paged cache as [Nkv, L, D]."""
    if cache.dim() == 3:
        blocks = cache.reshape(cache.size(0), cache.size(1), nkv, cache.size(2) // nkv)
    elif cache.dim() == 4:
        require(layout.query not in ("BSH", "BSND"), c.op, arg, tuple(cache.shape),
                "a (blocknum, blocksize, H) cache for BSH/BSND queries")
        blocks = cache.transpose(1, 2)
    else:
        reject(c.op, arg, tuple(cache.shape), "a 3-D or 4-D ND paged cache (NZ caches are not emulated)")
    require(blocks.size(1) == c.block_size and blocks.size(2) == nkv, c.op, "block_size", c.block_size,
            f"the cache's block dim with {nkv} KV heads (cache shape {tuple(cache.shape)})")
    table = c.block_table.long()
    out = []
    for b, n in enumerate(lens):
        pos = torch.arange(n)
        require(b < table.size(0) and n <= table.size(1) * c.block_size, c.op, "block_table",
                tuple(table.shape), f"a row per batch covering {n} tokens")
        out.append(blocks[table[b, pos // c.block_size], pos % c.block_size].transpose(0, 1))
    return out


def _keep(c: FiaCall, b: int, sq: int, skv: int) -> torch.Tensor:
    """[Sq, Skv] bool, True where the score is kept (mask value 1 means masked)."""
    i = torch.arange(sq).unsqueeze(1)
    j = torch.arange(skv).unsqueeze(0)
    delta = skv - sq
    mode = c.sparse_mode
    if sq == 1 and c.query_rope is None and mode in (2, 3, 4):
        return torch.ones(sq, skv, dtype=torch.bool)  # sparse_mode is ignored for Q_S == 1 without rope
    if mode == 2:
        return j <= i
    if mode == 3:
        return j <= i + delta
    if mode == 4:
        return (j >= i + delta - c.pre_tokens) & (j <= i + delta + c.next_tokens)
    if c.atten_mask is None:
        return torch.ones(sq, skv, dtype=torch.bool)
    mask = c.atten_mask
    mask = {2: lambda: mask, 3: lambda: mask[b], 4: lambda: mask[b, 0]}.get(mask.dim(), lambda: None)()
    require(mask is not None and mask.size(-2) >= sq and mask.size(-1) >= skv, c.op, "atten_mask",
            tuple(c.atten_mask.shape), f"(Q_S, KV_S), (B, Q_S, KV_S) or (B, 1, Q_S, KV_S) covering {sq}x{skv}")
    keep = mask[:sq, :skv] == 0
    if mode == 0:
        keep = keep & (j >= i - c.pre_tokens) & (j <= i + c.next_tokens)
    return keep


def _attend(c: FiaCall, b: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            q_rope: torch.Tensor | None, k_rope: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch: q [N,Sq,D], k [Nkv,Skv,D], v [Nkv,Skv,Dv] -> out [N,Sq,Dv], lse [N,Sq]."""
    group = q.size(0) // k.size(0)
    scores = q.float() @ k.float().repeat_interleave(group, 0).transpose(1, 2)
    if q_rope is not None:
        scores = scores + q_rope.float() @ k_rope.float().repeat_interleave(group, 0).transpose(1, 2)
    scores = scores * c.scale
    if c.pse_shift is not None:
        pse = c.pse_shift[b if c.pse_shift.size(0) > 1 else 0]
        scores = scores + pse[:, :q.size(1), :k.size(1)].float()
    return attend(scores, _keep(c, b, q.size(1), k.size(1)), v.repeat_interleave(group, 0))

"""Attention metadata for one flat batch (vLLM's order: decode requests first, then prefills).

A decode request has 1 to MAX_DECODE_TOKENS new tokens over its cached context: one for plain
decoding, 1 + k when k draft tokens are verified (speculative decoding, DeepSeek's MTP), causal
among themselves. Which requests are decodes is the producer's choice, as in vLLM (its
`reorder_batch_threshold`); a request after the decodes is a prefill of 2 or more tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .cache import PagedLatentCache

# most new tokens a decode request may have: what FIA's MLA mode takes per request (npu.limits),
# and so vllm-ascend's cap on 1 + num_speculative_tokens
MAX_DECODE_TOKENS = 16


class MetadataError(ValueError):
    """Metadata that cannot describe a valid batch."""


@dataclass
class MLAMetadata:
    slot_mapping: torch.Tensor      # int64 [T]: flat cache slot of each new token, -1 = write nothing
    block_table: torch.Tensor       # int32 [B, max_blocks]: physical blocks of each request
    seq_lens: torch.Tensor          # int32 [B]: context length after this step (cached + new)
    query_start_loc: torch.Tensor   # int32 [B + 1]: request b owns tokens [qsl[b], qsl[b+1])
    num_decodes: int                # decode requests (1..MAX_DECODE_TOKENS new tokens each), first in the batch
    num_decode_tokens: int          # their new tokens: num_decodes when each has one
    num_prefills: int

    @property
    def num_reqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.shape[0]

    @property
    def multi_token_decodes(self) -> bool:
        """Some decode request verifies more than one new token."""
        return self.num_decode_tokens > self.num_decodes

    @property
    def phase(self) -> str:
        """'decode' (one new token per request), 'prefill', 'mixed' (one-token decodes and prefills);
        with decodes of several new tokens, 'multi_decode' (decodes only) or 'multi_mixed' (and prefills)."""
        if self.num_prefills == 0:
            return "multi_decode" if self.multi_token_decodes else "decode"
        if self.num_decodes == 0:
            return "prefill"
        return "multi_mixed" if self.multi_token_decodes else "mixed"

    def validate(self, cache: PagedLatentCache | None = None, num_tokens: int | None = None,
                 reserved_block: int | None = None) -> None:
        """Full consistency check (reads the tensors; not for the hot path). Raises MetadataError.
        `reserved_block`: a block no request may hold (graph-mode decode writes its padding there)."""
        B = self.seq_lens.shape[0]
        for name in ("slot_mapping", "block_table", "seq_lens", "query_start_loc"):
            tensor = getattr(self, name)
            if tensor.dtype not in (torch.int32, torch.int64):
                raise MetadataError(f"{name} must be int32 or int64, got {tensor.dtype}")
        if self.seq_lens.dim() != 1:
            raise MetadataError(f"seq_lens must be 1-D [num_reqs], got shape {list(self.seq_lens.shape)}")
        if self.query_start_loc.shape != (B + 1,):
            raise MetadataError(f"query_start_loc must have num_reqs + 1 = {B + 1} entries, "
                                f"got shape {list(self.query_start_loc.shape)}")
        if self.block_table.dim() != 2 or self.block_table.shape[0] != B:
            raise MetadataError(f"block_table must be [num_reqs={B}, max_blocks], got {list(self.block_table.shape)}")
        qsl = self.query_start_loc.tolist()
        T = self.slot_mapping.shape[0]
        if qsl[0] != 0 or any(b < a for a, b in zip(qsl, qsl[1:])):
            raise MetadataError(f"query_start_loc must start at 0 and never decrease, got {qsl}")
        if qsl[-1] != T:
            raise MetadataError(f"query_start_loc ends at {qsl[-1]} but slot_mapping has {T} tokens")
        if num_tokens is not None and num_tokens != T:
            raise MetadataError(f"hidden_states has {num_tokens} tokens but slot_mapping has {T}")
        q_lens = [b - a for a, b in zip(qsl, qsl[1:])]
        seq_lens = self.seq_lens.tolist()
        for b, (q, s) in enumerate(zip(q_lens, seq_lens)):
            if q < 1:
                raise MetadataError(f"request {b} has no new tokens (query_start_loc {qsl}); every request "
                                    f"in a batch has at least one")
            if q > s:
                raise MetadataError(f"request {b}: {q} new tokens but seq_lens[{b}] = {s} (must be >= new tokens)")
        counts = (self.num_decodes, self.num_decode_tokens, self.num_prefills)
        if self.num_decodes + self.num_prefills != B or not 0 <= self.num_decodes <= B:
            raise MetadataError(f"(num_decodes, num_decode_tokens, num_prefills) = {counts} but the batch has "
                                f"{B} requests (query lengths {q_lens})")
        decode_lens = q_lens[:self.num_decodes]
        if sum(decode_lens) != self.num_decode_tokens:
            raise MetadataError(f"(num_decodes, num_decode_tokens, num_prefills) = {counts} but the first "
                                f"{self.num_decodes} requests' query lengths {decode_lens} sum to "
                                f"{sum(decode_lens)} (query lengths {q_lens})")
        long = [b for b, q in enumerate(decode_lens) if q > MAX_DECODE_TOKENS]
        if long:
            raise MetadataError(f"decode request {long[0]} has {decode_lens[long[0]]} new tokens; a decode request "
                                f"has 1 to {MAX_DECODE_TOKENS} (query lengths {q_lens}, num_decodes "
                                f"{self.num_decodes})")
        single = [b for b in range(self.num_decodes, B) if q_lens[b] == 1]
        if single:
            raise MetadataError(f"decode requests must come first: request {single[0]} has 1 new token but is "
                                f"counted as a prefill (num_decodes {self.num_decodes}, query lengths {q_lens})")
        if cache is None:
            return
        bs, nb = cache.block_size, cache.num_blocks
        table = self.block_table.tolist()
        slots = self.slot_mapping.tolist()
        written: dict[int, int] = {}
        for b, (q, s) in enumerate(zip(q_lens, seq_lens)):
            if s > len(table[b]) * bs:
                raise MetadataError(f"request {b}: context of {s} tokens is longer than its "
                                    f"{len(table[b])} blocks of {bs} hold")
            used = table[b][: -(-s // bs)]
            bad = [blk for blk in used if not 0 <= blk < nb]
            if bad:
                raise MetadataError(f"request {b}: block ids {bad} out of range [0, {nb})")
            if reserved_block is not None and reserved_block in used:
                raise MetadataError(f"request {b}: its context holds block {reserved_block}, the padding block "
                                    f"graph-mode decode writes its padded rows into (cache.PADDING_BLOCK; "
                                    f"BlockAllocator and vLLM never hand it out); block table {table[b]}")
            unused = [blk for blk in table[b][len(used):] if not 0 <= blk < nb]
            if unused:
                raise MetadataError(f"request {b}: block_table entries past its context {unused} out of range "
                                    f"[0, {nb}); the kernels gather whole rows, so padding entries must be valid "
                                    f"block ids (vLLM pads with 0)")
            for i in range(q):
                pos = s - q + i
                slot = slots[qsl[b] + i]
                if slot == -1:
                    continue
                if not 0 <= slot < nb * bs:
                    raise MetadataError(f"slot_mapping[{qsl[b] + i}] = {slot} out of range [0, {nb * bs}) "
                                        f"(or -1 for no write)")
                expected = used[pos // bs] * bs + pos % bs
                if slot != expected:
                    raise MetadataError(f"slot_mapping[{qsl[b] + i}] = {slot} but request {b} position {pos} "
                                        f"lives in slot {expected} by its block table")
                if slot in written:
                    raise MetadataError(f"slot_mapping[{qsl[b] + i}] = {slot} is also slot_mapping[{written[slot]}]: "
                                        f"two tokens would write the same cache slot")
                written[slot] = qsl[b] + i


def build_metadata(requests: Sequence[tuple[int, int]], block_tables: Sequence[Sequence[int]],
                   block_size: int, *, device: torch.device | str = "cpu",
                   decode_tokens: int = 1) -> MLAMetadata:
    """requests[b] = (new_tokens, cached_tokens); block_tables[b] = physical blocks of request b.

    Decode requests come first, as vLLM orders them: the leading requests with at most
    `decode_tokens` new tokens (1, or 1 + k to verify k draft tokens; at most MAX_DECODE_TOKENS)
    over a cached context (one new token needs none). Every later request must have more.
    """
    if isinstance(decode_tokens, bool) or not isinstance(decode_tokens, int) \
            or not 1 <= decode_tokens <= MAX_DECODE_TOKENS:
        raise MetadataError(f"decode_tokens must be an int in 1..{MAX_DECODE_TOKENS} (most new tokens of a "
                            f"decode request), got {decode_tokens!r}")
    if len(requests) != len(block_tables):
        raise MetadataError(f"{len(requests)} requests but {len(block_tables)} block table rows")
    if block_size < 1:
        raise MetadataError(f"block_size must be >= 1, got {block_size}")
    qsl, seq_lens, slots = [0], [], []
    for b, ((new, cached), row) in enumerate(zip(requests, block_tables)):
        if isinstance(new, bool) or isinstance(cached, bool) or not isinstance(new, int) \
                or not isinstance(cached, int) or new < 1 or cached < 0:
            raise MetadataError(f"request {b}: (new_tokens, cached_tokens) = {(new, cached)}; "
                                f"need new_tokens >= 1 and cached_tokens >= 0")
        bad = [blk for blk in row if isinstance(blk, bool) or not isinstance(blk, int) or blk < 0]
        if bad:
            raise MetadataError(f"request {b}: block ids must be non-negative ints (physical block numbers), "
                                f"got {bad} in its block table {list(row)}")
        total = new + cached
        if total > len(row) * block_size:
            raise MetadataError(f"request {b}: {total} tokens need {-(-total // block_size)} blocks of "
                                f"{block_size}, its block table has {len(row)}")
        qsl.append(qsl[-1] + new)
        seq_lens.append(total)
        slots.extend(row[p // block_size] * block_size + p % block_size for p in range(cached, total))
    width = max([len(r) for r in block_tables] + [1])
    table = [list(r) + [0] * (width - len(r)) for r in block_tables]
    q_lens = [new for new, _ in requests]

    def is_decode(new: int, cached: int) -> bool:
        return new == 1 or (new <= decode_tokens and cached > 0)

    decodes = 0
    while decodes < len(requests) and is_decode(*requests[decodes]):
        decodes += 1
    late = [b for b in range(decodes, len(requests)) if is_decode(*requests[b])]
    if late:
        raise MetadataError(f"decode requests must come first, got new-token counts {q_lens} (request {late[0]} "
                            f"is a decode: at most decode_tokens={decode_tokens} new tokens over a cached "
                            f"context)")
    return MLAMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        block_table=torch.tensor(table, dtype=torch.int32, device=device).reshape(len(requests), width),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        num_decodes=decodes,
        num_decode_tokens=sum(q_lens[:decodes]),
        num_prefills=len(requests) - decodes,
    )


def positions_for(requests: Sequence[tuple[int, int]], *, device: torch.device | str = "cpu") -> torch.Tensor:
    """Positions of the new tokens of each request: cached, cached + 1, ..."""
    for b, request in enumerate(requests):
        new, cached = request
        if isinstance(new, bool) or isinstance(cached, bool) or not isinstance(new, int) or not isinstance(cached, int) \
                or new < 1 or cached < 0:
            raise MetadataError(f"request {b}: (new_tokens, cached_tokens) = {tuple(request)}; need ints with "
                                f"new_tokens >= 1 and cached_tokens >= 0")
    if not requests:
        return torch.zeros(0, dtype=torch.int64, device=device)
    return torch.cat([torch.arange(cached, cached + new) for new, cached in requests]).to(device)

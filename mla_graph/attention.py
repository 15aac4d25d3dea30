"""MLAAttention: the one definition of Multi-head Latent Attention, as plain math.

Every request attends over its whole context with K and V decompressed by kv_b_proj, causal
within its new tokens. Weight absorption, paging and kernel fusion are passes, not code here.
Parameter names match Hugging Face's DeepseekV3Attention so its state_dict loads unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from . import primitives  # noqa: F401  (registers torch.ops.mla)
from .cache import PagedLatentCache
from .config import MLAConfig
from .envflags import env_flag
from .layer_op import call_layer, ensure_layer_op, register_layer
from .metadata import MAX_DECODE_TOKENS, MLAMetadata, MetadataError
from .rope import cos_sin_table

mla = torch.ops.mla
ensure_layer_op()   # mla::layer, what torch.compile records for a layer, exists wherever the layer does

CHECKED_ENV = "MLA_GRAPH_CHECKED"


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mla.rms_norm(x, self.weight, self.eps)


class MLAAttention(nn.Module):
    """forward(hidden_states [T, hidden], positions [T], kv_cache, metadata) -> [T, hidden].

    With tp_size > 1 the layer holds this rank's share of heads (num_heads / tp_size), as vLLM
    shards them: q_b_proj/q_proj and kv_b_proj by output rows, o_proj by input columns; the
    output is then this rank's partial sum (vLLM all-reduces it).
    """

    checked: bool | None = None   # value checks before each call; None: $MLA_GRAPH_CHECKED decides

    def __init__(self, config: MLAConfig, *, dtype: torch.dtype = torch.float32,
                 tp_size: int = 1, tp_rank: int = 0) -> None:
        super().__init__()
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank must be in [0, tp_size={tp_size}), got {tp_rank}")
        self.config = config
        self.tp_size, self.tp_rank = tp_size, tp_rank
        self.num_heads = config.heads_per_rank(tp_size)
        c, n = config, self.num_heads

        def linear(i: int, o: int) -> nn.Linear:
            return nn.Linear(i, o, bias=False, dtype=dtype)

        if c.q_lora_rank is None:
            self.q_proj = linear(c.hidden_size, n * c.qk_head_dim)
        else:
            self.q_a_proj = linear(c.hidden_size, c.q_lora_rank)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps, dtype)
            self.q_b_proj = linear(c.q_lora_rank, n * c.qk_head_dim)
        self.kv_a_proj_with_mqa = linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps, dtype)
        self.kv_b_proj = linear(c.kv_lora_rank, n * (c.qk_nope_head_dim + c.v_head_dim))
        self.o_proj = linear(n * c.v_head_dim, c.hidden_size)
        self.register_buffer("cos_sin", cos_sin_table(c), persistent=False)
        self.scale = c.softmax_scale
        register_layer(self)   # the key its mla::layer nodes carry under torch.compile (layer_op)

    def __setstate__(self, state: dict) -> None:
        # copy.copy / deepcopy / unpickling make a layer without __init__: register the new one too
        super().__setstate__(state)
        register_layer(self)

    @property
    def dtype(self) -> torch.dtype:
        return self.kv_b_proj.weight.dtype

    def forward(self, hidden_states: torch.Tensor, positions: torch.Tensor,
                kv_cache: PagedLatentCache, metadata: MLAMetadata) -> torch.Tensor:
        check_call(self.config, self.dtype, hidden_states, positions, kv_cache, metadata)
        if torch.compiler.is_compiling():
            # torch.compile: the whole layer becomes one opaque mla::layer node, so the "mla_graph"
            # backend can find it and lower it (other backends run it eagerly)
            return call_layer(self, hidden_states, positions, kv_cache, metadata)
        if checked_mode(self.checked):
            check_values(self.config, positions, kv_cache, metadata)
        if hidden_states.shape[0] == 0:
            return hidden_states.new_zeros(0, self.config.hidden_size)
        return self.plain_forward(hidden_states, positions, kv_cache.latent, kv_cache.rope,
                                  metadata.slot_mapping, metadata.block_table, metadata.seq_lens,
                                  metadata.query_start_loc)

    def plain_forward(self, hidden_states: torch.Tensor, positions: torch.Tensor,
                      latent_cache: torch.Tensor, rope_cache: torch.Tensor, slot_mapping: torch.Tensor,
                      block_table: torch.Tensor, seq_lens: torch.Tensor,
                      query_start_loc: torch.Tensor) -> torch.Tensor:
        """The math, over flat tensors only: this is what `capture` traces."""
        c, n = self.config, self.num_heads
        T = hidden_states.shape[0]
        B = block_table.shape[0]
        P, R, L, V = c.qk_nope_head_dim, c.qk_rope_head_dim, c.kv_lora_rank, c.v_head_dim

        if c.q_lora_rank is None:
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        q = q.view(T, n, P + R)
        q_nope, q_pe = q.split([P, R], dim=-1)

        kv = self.kv_a_proj_with_mqa(hidden_states)
        c_kv, k_pe = kv.split([L, R], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)

        q_pe = mla.rope(q_pe, positions, self.cos_sin)
        k_pe = mla.rope(k_pe, positions, self.cos_sin)
        mla.cache_write(c_kv, k_pe, latent_cache, rope_cache, slot_mapping)

        # every request's whole context, read back from the cache and decompressed
        ctx_latent = mla.gather_paged(latent_cache, block_table)           # [B, S, L]
        ctx_rope = mla.gather_paged(rope_cache, block_table)               # [B, S, R]
        S = ctx_latent.shape[1]
        kv_ctx = self.kv_b_proj(ctx_latent).view(B, S, n, P + V)
        k_nope, v = kv_ctx.split([P, V], dim=-1)
        k = torch.cat([k_nope, ctx_rope.view(B, S, 1, R).expand(B, S, n, R)], dim=-1)
        query = torch.cat([q_nope, q_pe], dim=-1)

        out = mla.attention(query, k, v, query_start_loc, seq_lens, self.scale)  # [T, n, V]
        return self.o_proj(out.reshape(T, n * V))


def check_call(config: MLAConfig, dtype: torch.dtype, hidden_states: torch.Tensor,
               positions: torch.Tensor, kv_cache: PagedLatentCache, metadata: MLAMetadata) -> None:
    """Cheap structural checks (shapes, dtypes, counts; no device sync), on every call, before
    anything is written. The values in the tensors are checked in checked mode (check_values)."""
    if not isinstance(kv_cache, PagedLatentCache):
        raise TypeError(f"kv_cache must be a PagedLatentCache, got {type(kv_cache).__name__}")
    if not isinstance(metadata, MLAMetadata):
        raise TypeError(f"metadata must be an MLAMetadata, got {type(metadata).__name__}")
    if not isinstance(hidden_states, torch.Tensor) or not isinstance(positions, torch.Tensor):
        raise TypeError(f"hidden_states and positions must be tensors, got {type(hidden_states).__name__} "
                        f"and {type(positions).__name__}")
    if hidden_states.dim() != 2 or hidden_states.shape[1] != config.hidden_size:
        raise ValueError(f"hidden_states must be [num_tokens, {config.hidden_size}], got {list(hidden_states.shape)}")
    if hidden_states.dtype != dtype:
        raise ValueError(f"hidden_states is {hidden_states.dtype} but the layer's weights are {dtype}")
    T = hidden_states.shape[0]
    if positions.shape != (T,):
        raise ValueError(f"positions must be [{T}] (one per token), got {list(positions.shape)}")
    if positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be int32 or int64, got {positions.dtype}")
    kv_cache.check(config)
    if kv_cache.dtype != dtype:
        raise ValueError(f"kv_cache is {kv_cache.dtype} but the layer's weights are {dtype}")
    for name in ("slot_mapping", "block_table", "seq_lens", "query_start_loc"):
        tensor = getattr(metadata, name)
        if not isinstance(tensor, torch.Tensor) or tensor.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"metadata.{name} must be an int32 or int64 tensor, got "
                             f"{getattr(tensor, 'dtype', type(tensor).__name__)}")
    if metadata.slot_mapping.shape != (T,):
        raise ValueError(f"metadata.slot_mapping must be [{T}] (one per token), got {list(metadata.slot_mapping.shape)}")
    if metadata.seq_lens.dim() != 1:
        raise ValueError(f"metadata.seq_lens must be [num_reqs], got {list(metadata.seq_lens.shape)}")
    B = metadata.seq_lens.shape[0]
    if metadata.block_table.dim() != 2 or metadata.block_table.shape[0] != B:
        raise ValueError(f"metadata.block_table must be [num_reqs={B}, max_blocks], got {list(metadata.block_table.shape)}")
    if metadata.query_start_loc.shape != (B + 1,):
        raise ValueError(f"metadata.query_start_loc must be [num_reqs + 1 = {B + 1}], got {list(metadata.query_start_loc.shape)}")
    counts = {"num_decodes": metadata.num_decodes, "num_decode_tokens": metadata.num_decode_tokens,
              "num_prefills": metadata.num_prefills}
    bad = {k: v for k, v in counts.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0}
    if bad:
        raise ValueError(f"metadata counts must be non-negative ints, got {bad}")
    d, dt = metadata.num_decodes, metadata.num_decode_tokens
    if d + metadata.num_prefills != B or not d <= dt <= MAX_DECODE_TOKENS * d:
        raise ValueError(f"metadata: num_decodes ({d}) + num_prefills ({metadata.num_prefills}) must be num_reqs "
                         f"({B}), and num_decode_tokens ({dt}) between num_decodes and {MAX_DECODE_TOKENS} x "
                         f"num_decodes (1 to {MAX_DECODE_TOKENS} new tokens per decode request)")
    if (T == 0) != (B == 0):
        raise ValueError(f"a batch of {T} tokens cannot have {B} requests (every request has >= 1 new token)")
    if dt + 2 * metadata.num_prefills > T:
        raise ValueError(f"metadata: {dt} decode tokens (num_decode_tokens) and {metadata.num_prefills} prefills of "
                         f"2 or more tokens do not fit a batch of {T} tokens")


def checked_mode(setting: bool | None = None) -> bool:
    """Whether value checks run: `setting` when given, else $MLA_GRAPH_CHECKED (1/true/yes/on)."""
    if setting is not None:
        return bool(setting)
    return env_flag(CHECKED_ENV)


def check_values(config: MLAConfig, positions: torch.Tensor, kv_cache: PagedLatentCache,
                 metadata: MLAMetadata, reserved_block: int | None = None) -> None:
    """Checked mode: the values of the metadata and positions (reads them to the host: a device
    sync), before anything is written. Raises MetadataError naming the entry, its value and what
    the rest of the metadata requires. What it guarantees: every written slot is one of the
    request's own, in range and written once; every block read is in the cache; every context
    length covers its new tokens and fits its block table; every position is the token's place
    in its request (seq_len - new + i) and inside the rope table; with `reserved_block`, no request
    holds that block."""
    T = positions.shape[0]
    metadata.validate(kv_cache, T, reserved_block)
    pos = positions.tolist()
    qsl = metadata.query_start_loc.tolist()
    seq_lens = metadata.seq_lens.tolist()
    limit = config.max_position_embeddings
    for b, (start, end, s) in enumerate(zip(qsl, qsl[1:], seq_lens)):
        q = end - start
        for i in range(q):
            got, want = pos[start + i], s - q + i
            if got != want:
                where = ("out of the rope table's range [0, max_position_embeddings=" f"{limit})"
                         if not 0 <= got < limit else "")
                raise MetadataError(f"positions[{start + i}] = {got} but request {b} (seq_len {s}, {q} new tokens) "
                                    f"puts its new token {i} at position {want}" + (f"; {got} is {where}" if where else ""))
    if seq_lens and max(seq_lens) > limit:
        b = max(range(len(seq_lens)), key=seq_lens.__getitem__)
        raise MetadataError(f"seq_lens[{b}] = {seq_lens[b]}: the context passes max_position_embeddings ({limit}), "
                            f"the end of the rope table")


def shard_state_dict(state_dict: dict[str, torch.Tensor], config: MLAConfig, tp_size: int,
                     tp_rank: int) -> dict[str, torch.Tensor]:
    """This rank's share of a full (Hugging Face) state dict, sharded by heads as vLLM does."""
    n = config.heads_per_rank(tp_size)
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank must be in [0, tp_size={tp_size}), got {tp_rank}")
    lo, hi = tp_rank * n, (tp_rank + 1) * n
    out = dict(state_dict)
    q_key = "q_proj.weight" if config.q_lora_rank is None else "q_b_proj.weight"
    out[q_key] = state_dict[q_key].view(config.num_heads, config.qk_head_dim, -1)[lo:hi].reshape(n * config.qk_head_dim, -1)
    kv_width = config.qk_nope_head_dim + config.v_head_dim
    out["kv_b_proj.weight"] = state_dict["kv_b_proj.weight"].view(config.num_heads, kv_width, -1)[lo:hi].reshape(n * kv_width, -1)
    out["o_proj.weight"] = state_dict["o_proj.weight"][:, lo * config.v_head_dim: hi * config.v_head_dim]
    return {k: v.contiguous() for k, v in out.items()}

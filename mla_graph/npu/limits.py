"""The documented limits of the torch-npu 2.13.0 kernels MLA lowers to, as checks.

One place for the numbers, used twice: the emulated kernels reject a call outside them (as the
hardware would), and the passes ask before they emit a kernel, routing around a limit instead of
failing (mla_graph/targets.py). Every limit cites the op doc of the torch-npu 2.13.0 wheel
(torch_npu/_op_plugin_docs.py, by line). A limit that vllm-ascend's production use contradicts is
*advisory*: the kernels accept it and `mla-graph check` reports it, with the reason.
torch-npu 2.10.0.post4's op docs state each of these limits in the same words (its line numbers
are 37 to 52 lower: L8176 there is L8132), so the same checks hold on both supported stacks.

The checks take shapes, dtypes and ints, never data, so passes run them on fake values; the
data-dependent ones (query tokens per request, cache_index range) take the values when known.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

DOCS = "torch-npu 2.13.0 op docs (torch_npu/_op_plugin_docs.py)"
FIA = "npu_fused_infer_attention_score"
PROLOG = "npu_mla_prolog_v3"

# FIA, MLA mode (query_rope/key_rope given, sparse_mode != 4): L8174-L8183
MLA_QUERY_DTYPES = (torch.float16, torch.bfloat16)   # query_rope follows query (L8105-L8106)
MLA_MAX_QUERY_TOKENS = 16           # query S per request, 1..16 (L8176)
MLA_HEADS = (32, 64, 128)           # query N (L8176); advisory, see fia_mla
MLA_LATENT, MLA_ROPE = 512, 64      # query/key D and the rope D (L8176-L8177)
MLA_BLOCK_SIZES = (16, 128)         # PageAttention is mandatory in MLA mode (L8182)
# FIA, TND layout without rope: L8193-L8199
TND_DTYPES = (torch.bfloat16,)
TND_HEADS = (8, 16, 32, 64, 128)
TND_QK_DIM, TND_V_DIMS = 192, (128, 192)
TND_MAX_TOKENS = 65536
# npu_mla_prolog_v3: L9604-L9663
PROLOG_HIDDEN = (7168, 7680, 6144)
PROLOG_Q_LORA = 1536
PROLOG_HEADS = (1, 2, 4, 8, 16, 32, 64, 128)
PROLOG_LATENT, PROLOG_NOPE, PROLOG_ROPE = 512, 128, 64
PROLOG_BLOCK_SIZES = (16, 128)
PROLOG_CACHE_MODES = ("PA_BSND", "PA_NZ")
PROLOG_NZ_WEIGHTS = ("weight_dq", "weight_uq_qr", "weight_dkv_kr")   # FRACTAL_NZ (L9605-L9608)
# npu_format_cast codes: 29 = FRACTAL_NZ (op docs L1288, L5311); 2 = ND (torchair's Format enum)
ACL_FORMAT_ND, ACL_FORMAT_FRACTAL_NZ = 2, 29
# npu_interleave_rope has no op doc in the wheel; GE's InterleaveRope lists fp16 (its bf16 entry is
# missing, but vllm-ascend runs it in bf16): fp32 is routed to aten ops instead
INTERLEAVE_ROPE_DTYPES = (torch.float16, torch.bfloat16)

# vllm-ascend runs FIA MLA with fewer query heads per rank than 32 (DeepSeek-V2-Lite at TP 2 has 8;
# V3 at TP 8 has 16), and the v2 op doc of the same wheel lists N in 1..128 for MLA (L8703).
MLA_HEADS_ADVISORY = ("vllm-ascend runs FIA MLA with fewer heads per rank (V3 at TP 8: 16) and the "
                      "v2 doc (L8703) allows 1..128; reported, not rejected")


@dataclass(frozen=True)
class Violation:
    op: str
    arg: str
    value: object
    allowed: str
    where: str            # the doc section and line
    advisory: str = ""    # non-empty: why it is only reported

    def message(self) -> str:
        return (f"{self.op}: {self.arg}={self.value!r} is outside the documented limits; allowed: "
                f"{self.allowed} ({DOCS}, {self.where})")


class KernelLimitError(ValueError):
    """A kernel call the real NPU kernel's documented limits reject."""


def enforce(violations: Iterable[Violation]) -> None:
    """Raise KernelLimitError for the first non-advisory violation."""
    for v in violations:
        if not v.advisory:
            raise KernelLimitError(v.message())


def hard(violations: Iterable[Violation]) -> list[Violation]:
    return [v for v in violations if not v.advisory]


def _check(out: list[Violation], ok: bool, op: str, arg: str, value: object, allowed: str, where: str,
           advisory: str = "") -> None:
    if not ok:
        out.append(Violation(op, arg, value, allowed, where, advisory))


def _names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def fia_mla(*, dtype: torch.dtype, num_heads: int, latent: int, rope: int, kv_heads: int, block_size: int,
            paged: bool, query_tokens: Sequence[int] | None = None, op: str = FIA) -> list[Violation]:
    """FIA in MLA mode (query_rope and key_rope given). `query_tokens`: per-request query lengths
    when known (decode: all 1)."""
    out: list[Violation] = []
    _check(out, dtype in MLA_QUERY_DTYPES, op, "query.dtype", dtype, _names(MLA_QUERY_DTYPES),
           "query_rope/key_rope dtypes, L8105-L8106")
    _check(out, num_heads in MLA_HEADS, op, "num_heads", num_heads, f"one of {MLA_HEADS}",
           "MLA constraints, L8176", MLA_HEADS_ADVISORY)
    _check(out, latent == MLA_LATENT, op, "query D", latent, f"{MLA_LATENT} (the latent)", "MLA constraints, L8176")
    _check(out, rope == MLA_ROPE, op, "query_rope D", rope, str(MLA_ROPE), "MLA constraints, L8176")
    _check(out, kv_heads == 1, op, "key N", kv_heads, "1 (one latent head)", "MLA constraints, L8177")
    _check(out, paged, op, "block_table", None, "a block table (PageAttention is mandatory in MLA mode)",
           "MLA constraints, L8182")
    if paged:
        _check(out, block_size in MLA_BLOCK_SIZES, op, "block_size", block_size, f"one of {MLA_BLOCK_SIZES}",
               "MLA constraints, L8182")
    longest = max(query_tokens, default=1) if query_tokens is not None else None
    if longest is not None:
        _check(out, 1 <= longest <= MLA_MAX_QUERY_TOKENS, op, "query tokens per request", longest,
               f"1..{MLA_MAX_QUERY_TOKENS} (vllm-ascend: FIA_SEQ_LEN_LIMIT)", "MLA constraints, L8176")
    return out


def fia_tnd(*, dtype: torch.dtype, num_heads: int, num_kv_heads: int, qk_dim: int, v_dim: int,
            sparse_mode: int, has_mask: bool, tokens: int | None = None,
            q_lens: Sequence[int] | None = None, kv_lens: Sequence[int] | None = None,
            op: str = FIA) -> list[Violation]:
    """FIA with input_layout TND and no rope inputs (decompressed prefill)."""
    out: list[Violation] = []
    where = "TND constraints, L8193-L8199"
    _check(out, dtype in TND_DTYPES, op, "query.dtype", dtype, _names(TND_DTYPES), where)
    _check(out, num_heads in TND_HEADS, op, "num_heads", num_heads, f"one of {TND_HEADS}", where)
    _check(out, num_kv_heads in (0, num_heads), op, "num_key_value_heads", num_kv_heads,
           f"{num_heads} (Q_N = K_N = V_N)", where)
    _check(out, qk_dim == TND_QK_DIM, op, "query/key D", qk_dim, str(TND_QK_DIM), where)
    _check(out, v_dim in TND_V_DIMS, op, "value D", v_dim, f"one of {TND_V_DIMS}", where)
    _check(out, (sparse_mode, has_mask) in ((0, False), (3, True)), op, "sparse_mode", sparse_mode,
           "0 without atten_mask or 3 with it", where)
    if tokens is not None:
        _check(out, tokens <= TND_MAX_TOKENS, op, "T", tokens, f"<= {TND_MAX_TOKENS}", where)
    if q_lens is not None and kv_lens is not None and sparse_mode == 3:
        # The doc says "actual_seq_lengths < actual_seq_lengths_kv" per batch; a first chunk with no
        # cached prefix has them equal, as vllm-ascend's prefill does, so equal is admitted.
        over = [(q, kv) for q, kv in zip(q_lens, kv_lens) if q > kv]
        _check(out, not over, op, "actual_seq_lengths", over[:1], "per request <= its actual_seq_lengths_kv",
               "TND constraints, L8199")
    return out


def mla_prolog(*, token_dtype: torch.dtype, hidden: int, q_lora: int, heads: int, latent: int, nope: int,
               rope: int, block_size: int, cache_mode: str, weight_formats: dict[str, int] | None = None,
               cache_index: torch.Tensor | None = None, cache_slots: int | None = None,
               op: str = PROLOG) -> list[Violation]:
    """npu_mla_prolog_v3(_functional). `weight_formats` {arg: ACL format} and `cache_index` (with
    the cache's num_blocks * block_size) are checked when given (the kernel itself does not
    validate cache_index: an index outside the cache writes out of bounds, L9616)."""
    out: list[Violation] = []
    _check(out, token_dtype == torch.bfloat16, op, "token_x.dtype", token_dtype,
           "bfloat16 (int8 when quantized)", "token_x, L9604")
    _check(out, hidden in PROLOG_HIDDEN, op, "He (hidden size)", hidden, f"one of {PROLOG_HIDDEN}", "L9652")
    _check(out, q_lora == PROLOG_Q_LORA, op, "Hcq (q_lora_rank)", q_lora, str(PROLOG_Q_LORA), "L9654")
    _check(out, heads in PROLOG_HEADS, op, "N (heads)", heads, f"one of {PROLOG_HEADS}", "L9655")
    _check(out, latent == PROLOG_LATENT, op, "Hckv (kv_lora_rank)", latent, str(PROLOG_LATENT), "L9657")
    _check(out, nope == PROLOG_NOPE, op, "D (qk_nope_head_dim)", nope, str(PROLOG_NOPE), "L9659")
    _check(out, rope == PROLOG_ROPE, op, "Dr (qk_rope_head_dim)", rope, str(PROLOG_ROPE), "L9660")
    _check(out, block_size in PROLOG_BLOCK_SIZES, op, "BlockSize", block_size, f"one of {PROLOG_BLOCK_SIZES}",
           "L9663")
    _check(out, cache_mode in PROLOG_CACHE_MODES, op, "cache_mode", cache_mode, f"one of {PROLOG_CACHE_MODES}",
           "L9628")
    for arg, fmt in (weight_formats or {}).items():
        _check(out, fmt == ACL_FORMAT_FRACTAL_NZ, op, f"{arg} format", fmt,
               f"FRACTAL_NZ ({ACL_FORMAT_FRACTAL_NZ}): cast once with npu_format_cast(w, 29)", "L9605-L9608")
    if cache_index is not None and cache_slots is not None and cache_index.numel():
        low, high = int(cache_index.min()), int(cache_index.max())
        _check(out, 0 <= low and high < cache_slots, op, "cache_index", (low, high),
               f"every value in [0, {cache_slots}) (num_blocks * block_size; not validated by the kernel)",
               "cache_index, L9616")
    return out

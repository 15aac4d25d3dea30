"""Layouts of npu_fused_infer_attention_score(_v2): the META shape rules and the
conversions between a layout and per-batch [N, S, D] tensors."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mla_graph.npu._checks import reject, require

# input_layout -> (query layout, output layout, query rank): META's LAYOUT_MAP.
LAYOUTS: dict[str, tuple[str, str, int]] = {
    "BSH": ("BSH", "BSH", 3),
    "BSND": ("BSND", "BSND", 4),
    "BNSD": ("BNSD", "BNSD", 4),
    "TND": ("TND", "TND", 3),
    "NTD": ("NTD", "NTD", 3),
    "BNSD_BSND": ("BNSD", "BSND", 4),
    "BSH_BNSD": ("BSH", "BNSD", 3),
    "BSND_BNSD": ("BSND", "BNSD", 4),
    "NTD_TND": ("NTD", "TND", 3),
    "BSH_NBSD": ("BSH", "NBSD", 3),
    "BSND_NBSD": ("BSND", "NBSD", 4),
    "BNSD_NBSD": ("BNSD", "NBSD", 4),
    "TND_NTD": ("TND", "NTD", 3),
    "NSD": ("NSD", "NSD", 3),
}
TOKEN_LAYOUTS = frozenset({"TND", "NTD"})
LSE_TOKEN_LAYOUTS = frozenset({"TND", "NTD", "TND_NTD", "NTD_TND"})


@dataclass(frozen=True)
class Layout:
    input_layout: str
    query: str
    out: str

    @property
    def token_major(self) -> bool:
        return self.query in TOKEN_LAYOUTS


def parse_layout(op: str, input_layout: str, query: torch.Tensor) -> Layout:
    if input_layout not in LAYOUTS:
        reject(op, "input_layout", input_layout, f"one of {sorted(LAYOUTS)}")
    q_layout, out_layout, q_dim = LAYOUTS[input_layout]
    require(query.dim() == q_dim, op, "query", tuple(query.shape),
            f"a {q_dim}-D tensor for input_layout={input_layout!r}")
    return Layout(input_layout, q_layout, out_layout)


def query_bsnd(query: torch.Tensor, layout: str, num_heads: int) -> tuple[int, int, int, int]:
    """(B, S, N, D) of a query in a batch-major layout, as META's get_query_b_s_n_d."""
    if layout == "BSH":
        return query.size(0), query.size(1), num_heads, query.size(2) // num_heads
    if layout == "BSND":
        return query.size(0), query.size(1), query.size(2), query.size(3)
    if layout == "BNSD":
        return query.size(0), query.size(2), query.size(1), query.size(3)
    return 1, query.size(1), query.size(0), query.size(2)  # NSD


def query_tnd(query: torch.Tensor, layout: str) -> tuple[int, int, int]:
    if layout == "TND":
        return query.size(0), query.size(1), query.size(2)
    return query.size(1), query.size(0), query.size(2)  # NTD


def value_head_dim(op: str, value: torch.Tensor, query: torch.Tensor, layout: Layout,
                   paged: bool, num_kv_heads: int) -> int:
    """META's get_value_d (times 8 for int4 packed in int32)."""
    if paged:
        require(value.dim() in (3, 4, 5), op, "value", tuple(value.shape),
                "a 3/4/5-D paged cache when block_table is given")
        dims = {3: lambda: value.size(2) // num_kv_heads, 4: lambda: value.size(3),
                5: lambda: value.size(2) * value.size(4)}
        value_d = dims[value.dim()]()
    else:
        require(value.dim() == query.dim(), op, "value", tuple(value.shape),
                f"rank {query.dim()} (same as query) without block_table")
        if layout.query == "BSH":
            value_d = value.size(2) // num_kv_heads
        elif layout.query in ("BNSD", "BSND"):
            value_d = value.size(3)
        else:
            value_d = value.size(2)
    return value_d * (8 if value.dtype == torch.int32 else 1)


def output_shapes(query: torch.Tensor, layout: Layout, num_heads: int, value_d: int,
                  lse_wanted: bool) -> tuple[list[int], list[int]]:
    """Attention-out and softmax-lse shapes exactly as META infers them."""
    def out_d(q_d: int) -> int:
        return q_d if value_d == 0 or q_d == 0 else value_d

    if layout.out in ("TND", "NTD"):
        t, n, d = query_tnd(query, layout.query)
        out = [t, n, out_d(d)] if layout.out == "TND" else [n, t, out_d(d)]
    else:
        b, s, n, d = query_bsnd(query, layout.query, num_heads)
        out = {
            "BSND": [b, s, n, out_d(d)],
            "BNSD": [b, n, s, out_d(d)],
            "NBSD": [n, b, s, out_d(d)],
            "NSD": [n, s, out_d(d)],
        }.get(layout.out, [])
        if layout.out == "BSH":
            out_h = n * value_d
            out = [b, s, query.size(2) if out_h == 0 or query.size(2) == 0 else out_h]
    if not lse_wanted:
        return out, [0]
    if layout.input_layout in LSE_TOKEN_LAYOUTS:
        t, n, _ = query_tnd(query, layout.query)
        return out, [t, n, 1]
    b, s, n, _ = query_bsnd(query, layout.query, num_heads)
    return out, [b, n, s, 1]


def to_bnsd(x: torch.Tensor, layout: str, heads: int) -> torch.Tensor:
    """A batch-major tensor (query layout; K/V use it too) as [B, N, S, D]."""
    if layout == "BSH":
        b, s, h = x.shape
        return x.reshape(b, s, heads, h // heads).transpose(1, 2)
    if layout == "BSND":
        return x.transpose(1, 2)
    if layout == "BNSD":
        return x
    return x.unsqueeze(0)  # NSD


def to_tnd(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x if layout == "TND" else x.transpose(0, 1)


def from_bnsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    """[B, N, S, D] into an output layout."""
    if layout == "BSH":
        b, n, s, d = x.shape
        return x.transpose(1, 2).reshape(b, s, n * d)
    if layout == "BSND":
        return x.transpose(1, 2)
    if layout == "NBSD":
        return x.permute(1, 0, 2, 3)
    if layout == "NSD":
        return x.squeeze(0)
    return x  # BNSD


def from_tnd(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x if layout == "TND" else x.transpose(0, 1)

"""Which attention form a phase gets, from a small cost model (FLOPs and bytes moved).

decompressed: kv_b_proj expands every context token to per-head K and V, then attention with
              head dim P+R (values V).
absorbed:     q_nope @ W_UK, MQA over the latent cache (head dim L+R, values L), then @ W_UV.

Each phase is costed at a representative batch; the form with the lower estimated time
(max of compute time and memory time, roofline style) wins.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.fx import GraphModule

from mla_graph.contract import graph_meta, maybe_meta

from .base import Invariant, PassResult, Violation, graph_pass
from .mla_patterns import match_decompressed_attention, val
from .rewrite import Match

# Representative batches: (requests, new tokens per request, context tokens per request).
REPRESENTATIVE = {
    "decode": (32, 1, 4096),   # also the decode part of a split mixed batch
    "prefill": (4, 2048, 2048),
    "mixed": (32, 16, 2048),    # chunked prefill: short chunks riding along with decodes
    "multi_decode": (32, 4, 4096),   # speculative decoding: 1 + 3 draft tokens verified per request
    "multi_mixed": (32, 16, 2048),   # as mixed (split: each part costed as its own)
}
PEAK_FLOPS = 300e12     # bf16 matmul, Ascend 910B class
BANDWIDTH = 1.6e12      # HBM bytes/s


@dataclass(frozen=True)
class Dims:
    heads: int
    qk_nope: int
    rope: int
    latent: int
    v: int
    dtype_bytes: int


@dataclass(frozen=True)
class Cost:
    flops: float
    bytes: float

    @property
    def seconds(self) -> float:
        return max(self.flops / PEAK_FLOPS, self.bytes / BANDWIDTH)


def batch_costs(d: Dims, requests: list[tuple[int, int]]) -> dict[str, Cost]:
    """attention_costs summed over a real batch's (new tokens, context tokens: every key the request's
    attention reads, its new tokens included) per request: what a per-call choice of form (LoweredMLA,
    Target.form_per_call) compares."""
    total = {"decompressed": Cost(0.0, 0.0), "absorbed": Cost(0.0, 0.0)}
    for new, context in requests:
        for form, c in attention_costs(d, 1, new, context).items():
            total[form] = Cost(total[form].flops + c.flops, total[form].bytes + c.bytes)
    return total


def attention_costs(d: Dims, requests: int, new: int, context: int) -> dict[str, Cost]:
    T, C = requests * new, requests * context
    pairs = requests * new * context  # query-key pairs (upper bound; causal halves prefill)
    b = d.dtype_bytes
    n = d.heads
    decompressed = Cost(
        flops=2 * C * d.latent * n * (d.qk_nope + d.v) + 2 * pairs * n * (d.qk_nope + d.rope + d.v),
        bytes=b * (C * (d.latent + d.rope) + 2 * C * n * (d.qk_nope + d.rope + d.v)
                   + d.latent * n * (d.qk_nope + d.v)),
    )
    absorbed = Cost(
        flops=2 * T * n * d.qk_nope * d.latent + 2 * pairs * n * (d.latent + d.rope + d.latent)
        + 2 * T * n * d.latent * d.v,
        bytes=b * (C * (d.latent + d.rope) + d.latent * n * (d.qk_nope + d.v) + 2 * T * n * d.latent),
    )
    return {"decompressed": decompressed, "absorbed": absorbed}


def _every_attention_costed(gm: GraphModule) -> list[Violation]:
    """Every attention over decompressed values has a form: one the matcher did not recognise
    (a pass run before this one changed its pattern) would silently keep the decompressed form."""
    meta = maybe_meta(gm)
    if meta is None or meta.config is None:
        return []
    return [(n, f"{n.name} attends over decompressed values but is not in the pattern the cost model "
                f"matches (mla_patterns.match_decompressed_attention): a pass run before it changed the "
                f"pattern, so the layer would keep the decompressed form; run that pass after the "
                f"absorb-page stage") for n in gm.graph.nodes
            if n.op == "call_function" and n.target is torch.ops.mla.attention.default
            and "mla_attention_form" not in n.meta and val(n.args[2]).shape[-1] != meta.config.kv_lora_rank]


EVERY_ATTENTION_COSTED = Invariant("every decompressed attention has a form", _every_attention_costed)


@graph_pass(ensures=[EVERY_ATTENTION_COSTED])
def choose_attention_form(gm: GraphModule, *, admissible: Callable[[Match], str] | None = None
                          ) -> PassResult:
    """Records the form of each attention for the absorb pass (node.meta['mla_attention_form'], and
    graph_meta(gm).attention_form for the whole graph); the graph is not changed.

        attention(cat(q_nope, q_pe), cat(k_nope, k_pe), v)     # decompressed, as captured
      ->  (same graph; meta: mla_attention_form = 'absorbed' | 'decompressed')

    Each attention is costed at the representative batch of its phase, or of its part of a split
    mixed batch. With `admissible` (why a kernel cannot take the decompressed form, '' when it can),
    the decompressed form is chosen only where it is admitted; otherwise absorbed.
    """
    result = PassResult(changed=False)
    for node in gm.graph.nodes:
        m = match_decompressed_attention(node)
        if m is None:
            continue
        q = val(m.q_nope)
        dims = Dims(heads=q.shape[1], qk_nope=m.sizes[0], rope=val(m.q_pe).shape[-1],
                    latent=val(m.latent_cache).shape[-1], v=m.sizes[1], dtype_bytes=q.element_size())
        batch = node.meta.get("mla_batch_part") or graph_meta(gm).phase
        costs = attention_costs(dims, *REPRESENTATIVE[batch])
        form = min(costs, key=lambda f: costs[f].seconds)
        forced = graph_meta(gm).forced_attention_form if batch not in ("decode", "multi_decode") else None
        if forced is not None:
            form = forced       # lower()'s other graph of the phase, for a per-call choice of form
        why_not = admissible(m) if admissible is not None and form == "decompressed" else ""
        if why_not:
            form = "absorbed"
        node.meta["mla_attention_form"] = graph_meta(gm).attention_form = form
        result.notes.append(f"{node.name} ({batch}): " + ", ".join(
            f"{f} {c.flops / 1e9:.1f} GFLOP {c.bytes / 1e6:.1f} MB ~{c.seconds * 1e6:.1f} us"
            for f, c in costs.items()) + f" -> {form}" + (" (forced: the phase's other graph)" if forced else "")
            + (f" (decompressed not admitted: {why_not})" if why_not else ""))
    return result

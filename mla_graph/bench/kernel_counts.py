"""2. Device kernels in each target's lowered decode graph, beside vllm-ascend's eager decode."""
from __future__ import annotations

import torch

from mla_graph.passes.base import VIEW_OPS

from ..attention import MLAAttention
from ..kernels import device_kernels
from ..lowering import lower
from ..targets import TARGETS
from .settings import Settings

# vllm-ascend's eager decode at the #2459 split (reference doc section 3b, front end from 1 and 3a),
# one entry per device kernel launched per layer per step; docs/benchmarks.md explains the count.
VLLM_ASCEND_EAGER_DECODE = (
    "q_a_proj matmul", "q_a_layernorm npu_rms_norm", "q_b_proj matmul", "kv_a_proj_with_mqa matmul",
    "kv_a_layernorm npu_rms_norm", "q_pe de-interleave copy", "k_pe de-interleave copy",
    "_npu_rotary_embedding (q and k)", "_npu_reshape_and_cache", "bmm q_nope x W_UK_T",
    "cat(ql_nope, q_pe)", "cat(nope_cache, rope_cache): 576-wide cache copy", "_npu_paged_attention_mla",
    "bmm x W_UV", "o_proj matmul",
)


def count_kernels(gm: torch.fx.GraphModule) -> dict[str, int]:
    """Device kernels of `gm` by op (mla_graph.kernels.device_kernels: views, torchair markers and
    the cache write-back copies GE turns into ref outputs are not kernels)."""
    counts: dict[str, int] = {}
    for op in device_kernels(gm):
        counts[op] = counts.get(op, 0) + 1
    return dict(sorted(counts.items()))


def kernels_per_decode(s: Settings, layer: MLAAttention) -> dict:
    """Lowers each target's decode graph once (which also warms up what lowering_cost times)."""
    config = layer.config
    out = {"preset": config.name, "excluded_ops": sorted(str(op) for op in VIEW_OPS) + ["air:: markers",
           "copy_ of an updated cache into its graph input"], "targets": {},
           "vllm_ascend_eager_decode": {"total": len(VLLM_ASCEND_EAGER_DECODE),
                                        "kernels": list(VLLM_ASCEND_EAGER_DECODE)}}
    for target in TARGETS:
        counts = count_kernels(lower(layer, target, ["decode"], block_size=s.block_size).graphs["decode"])
        out["targets"][target] = {"total": sum(counts.values()), "by_op": counts}
    return out

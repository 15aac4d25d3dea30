"""npu_fused_infer_attention_score and _v2: argument mapping onto fia.FiaCall.

Quantisation, shared-prefix, left-padding and learnable-sink inputs are not
emulated; passing one raises a ValueError naming it rather than silently
computing something the NPU would not.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from mla_graph.npu import fia
from mla_graph.npu._checks import reject, reject_given

V1 = "npu_fused_infer_attention_score"
V2 = "npu_fused_infer_attention_score_v2"
V2_NAMES = {"num_heads": "num_query_heads", "actual_seq_lengths": "actual_seq_qlen",
            "actual_seq_lengths_kv": "actual_seq_kvlen"}
Lens = Sequence[int] | None


def _v1_call(query, key, value, *, pse_shift=None, atten_mask=None, actual_seq_lengths=None,
             actual_seq_lengths_kv=None, dequant_scale1=None, quant_scale1=None, dequant_scale2=None,
             quant_scale2=None, quant_offset2=None, antiquant_scale=None, antiquant_offset=None,
             key_antiquant_scale=None, key_antiquant_offset=None, value_antiquant_scale=None,
             value_antiquant_offset=None, block_table=None, query_padding_size=None, kv_padding_size=None,
             key_shared_prefix=None, value_shared_prefix=None, actual_shared_prefix_len=None, query_rope=None,
             key_rope=None, key_rope_antiquant_scale=None, num_heads=1, scale=1.0, pre_tokens=2147483647,
             next_tokens=2147483647, input_layout="BSH", num_key_value_heads=0, sparse_mode=0, inner_precise=0,
             block_size=0, antiquant_mode=0, key_antiquant_mode=0, value_antiquant_mode=0,
             softmax_lse_flag=False) -> fia.FiaCall:
    reject_given(V1, dequant_scale1=dequant_scale1, quant_scale1=quant_scale1, dequant_scale2=dequant_scale2,
                 quant_scale2=quant_scale2, quant_offset2=quant_offset2, antiquant_scale=antiquant_scale,
                 antiquant_offset=antiquant_offset, key_antiquant_scale=key_antiquant_scale,
                 key_antiquant_offset=key_antiquant_offset, value_antiquant_scale=value_antiquant_scale,
                 value_antiquant_offset=value_antiquant_offset, query_padding_size=query_padding_size,
                 kv_padding_size=kv_padding_size, key_shared_prefix=key_shared_prefix,
                 value_shared_prefix=value_shared_prefix, actual_shared_prefix_len=actual_shared_prefix_len,
                 key_rope_antiquant_scale=key_rope_antiquant_scale)
    _reject_quantised_query(V1, query)
    return fia.FiaCall(V1, query, key, value, query_rope, key_rope, pse_shift, atten_mask,
                       _ints(actual_seq_lengths), _ints(actual_seq_lengths_kv), block_table, num_heads,
                       num_key_value_heads, scale, pre_tokens, next_tokens, input_layout, sparse_mode,
                       block_size, softmax_lse_flag)


def _v2_call(query, key, value, *, query_rope=None, key_rope=None, pse_shift=None, atten_mask=None,
             actual_seq_qlen=None, actual_seq_kvlen=None, block_table=None, dequant_scale_query=None,
             dequant_scale_key=None, dequant_offset_key=None, dequant_scale_value=None, dequant_offset_value=None,
             dequant_scale_key_rope=None, quant_scale_out=None, quant_offset_out=None, quant_scale_p=None,
             learnable_sink=None, num_query_heads=1, num_key_value_heads=0, softmax_scale=1.0,
             pre_tokens=2147483647, next_tokens=2147483647, input_layout="BSH", sparse_mode=0, block_size=0,
             query_quant_mode=0, key_quant_mode=0, value_quant_mode=0, inner_precise=0,
             return_softmax_lse=False, **reserved_dtypes) -> fia.FiaCall:
    # The *_dtype ints only describe quantised inputs, which are rejected below.
    reject_given(V2, dequant_scale_query=dequant_scale_query, dequant_scale_key=dequant_scale_key,
                 dequant_offset_key=dequant_offset_key, dequant_scale_value=dequant_scale_value,
                 dequant_offset_value=dequant_offset_value, dequant_scale_key_rope=dequant_scale_key_rope,
                 quant_scale_out=quant_scale_out, quant_offset_out=quant_offset_out, quant_scale_p=quant_scale_p,
                 learnable_sink=learnable_sink)
    _reject_quantised_query(V2, query)
    return fia.FiaCall(V2, query, key, value, query_rope, key_rope, pse_shift, atten_mask,
                       _ints(actual_seq_qlen), _ints(actual_seq_kvlen), block_table, num_query_heads,
                       num_key_value_heads, softmax_scale, pre_tokens, next_tokens, input_layout, sparse_mode,
                       block_size, return_softmax_lse, names=dict(V2_NAMES))


def _ints(lens: Lens) -> list[int] | None:
    # SymInts stay symbolic: under torch.compile the lengths are data, not values to guard on.
    return None if lens is None else [n if isinstance(n, torch.SymInt) else int(n) for n in lens]


def _reject_quantised_query(op: str, query: torch.Tensor) -> None:
    if not query.dtype.is_floating_point or query.element_size() == 1:
        reject(op, "query", query.dtype, "a float16 or bfloat16 query (quantised inputs are not emulated)")


def fia_v1(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    return fia.reference(_v1_call(*args, **kwargs))


def fia_v1_fake(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    return fia.fake(_v1_call(*args, **kwargs))


def fia_v2(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    return fia.reference(_v2_call(*args, **kwargs))


def fia_v2_fake(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    return fia.fake(_v2_call(*args, **kwargs))


KERNELS = {
    f"npu::{V1}": (fia_v1, fia_v1_fake),
    f"npu::{V2}": (fia_v2, fia_v2_fake),
}

"""device_kernels: the call_function nodes that launch a kernel, in graph order; views,
getitem and symbolic sizes are not kernels."""
from conftest import V3_TINY

from mla_graph import MLAAttention, lower
from mla_graph.kernels import device_kernels


def test_reference_decode_graph_kernels_in_order():
    gm = lower(MLAAttention(V3_TINY), "reference", ["decode"], block_size=16).graphs["decode"]
    linear, norm, rope, gather, cat = ("aten.linear.default", "mla.rms_norm.default", "mla.rope.default",
                                       "mla.gather_paged.default", "aten.cat.default")
    assert device_kernels(gm) == [linear, norm, linear,                 # q_a_proj, q_a_layernorm, q_b_proj
                                  linear, norm, rope, rope,             # kv_a_proj, kv_a_layernorm, q and k rope
                                  "mla.cache_write.default", gather, gather,
                                  linear, cat, cat,                     # kv_b_proj over the context; k, query
                                  "mla.attention.default", linear]      # o_proj

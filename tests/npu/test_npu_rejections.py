"""What the real kernels reject gives a ValueError naming the argument."""
import pytest
import torch
from prolog_args import prolog_args
from torch._subclasses.fake_tensor import FakeTensorMode

from mla_graph.npu import ensure_npu_ops

ensure_npu_ops()
npu, atb = torch.ops.npu, torch.ops.atb
fia = npu.npu_fused_infer_attention_score
H = torch.float16


def q4(*shape):
    return torch.randn(*shape).to(H)


PAGED = dict(block_table=torch.zeros(1, 1, dtype=torch.int32), actual_seq_lengths_kv=[4], input_layout="BNSD",
             num_heads=2, num_key_value_heads=1)
FIA_REJECTIONS = [
    ("query", lambda: fia(q4(2, 3, 8), q4(2, 3, 8), q4(2, 3, 8), num_heads=1, input_layout="BNSD")),
    ("input_layout", lambda: fia(q4(1, 2, 3, 8), q4(1, 2, 3, 8), q4(1, 2, 3, 8), input_layout="BHSD")),
    ("block_size", lambda: fia(q4(1, 2, 1, 8), q4(1, 16, 8), q4(1, 16, 8), block_size=0, **PAGED)),
    ("block_size", lambda: fia(q4(1, 2, 1, 8), q4(1, 528, 8), q4(1, 528, 8), block_size=528, **PAGED)),
    ("block_size", lambda: fia(q4(1, 2, 1, 8), q4(1, 24, 8), q4(1, 24, 8), block_size=24, **PAGED)),
    ("num_key_value_heads", lambda: fia(q4(1, 1, 48), q4(1, 2, 32), q4(1, 2, 32), num_heads=6,
                                        num_key_value_heads=4)),
    ("num_key_value_heads", lambda: fia(q4(1, 1, 128), q4(1, 2, 1), q4(1, 2, 1), num_heads=128,
                                        num_key_value_heads=1)),
    ("actual_seq_lengths", lambda: fia(q4(4, 2, 8), q4(4, 2, 8), q4(4, 2, 8), num_heads=2, input_layout="TND")),
    ("actual_seq_qlen", lambda: npu.npu_fused_infer_attention_score_v2(
        q4(4, 2, 8), q4(4, 2, 8), q4(4, 2, 8), num_query_heads=2, input_layout="TND")),
    ("actual_seq_lengths_kv", lambda: fia(q4(1, 2, 1, 8), q4(1, 16, 8), q4(1, 16, 8), num_heads=2,
                                          input_layout="BNSD", num_key_value_heads=1, block_size=16,
                                          block_table=torch.zeros(1, 1, dtype=torch.int32))),
    ("sparse_mode", lambda: fia(q4(1, 2, 3, 8), q4(1, 2, 3, 8), q4(1, 2, 3, 8), num_heads=2, input_layout="BNSD",
                                sparse_mode=5)),
    ("key_rope", lambda: fia(q4(1, 2, 1, 8), q4(1, 2, 3, 8), q4(1, 2, 3, 8), query_rope=q4(1, 2, 1, 4),
                             num_heads=2, input_layout="BNSD")),
    ("quant_scale2", lambda: fia(q4(1, 2, 3, 8), q4(1, 2, 3, 8), q4(1, 2, 3, 8), num_heads=2, input_layout="BNSD",
                                 quant_scale2=torch.ones(1))),
]


@pytest.mark.parametrize("arg,call", FIA_REJECTIONS, ids=[f"{i}-{a}" for i, (a, _) in enumerate(FIA_REJECTIONS)])
def test_fia_rejections_name_the_argument(arg, call):
    with pytest.raises(ValueError, match=rf"\b{arg}="):
        call()


def test_rejection_also_happens_at_trace_time():
    with FakeTensorMode(), pytest.raises(ValueError, match=r"\bsparse_mode=5"):
        q = torch.empty(1, 2, 3, 8, dtype=H)
        fia(q, q, q, num_heads=2, input_layout="BNSD", sparse_mode=5)


def _kv_call(**kwargs):
    kv, gamma, cos = torch.randn(1, 1, 2, 24), torch.ones(16), torch.randn(1, 1, 2, 8)
    caches = kwargs.pop("caches", (torch.zeros(1, 4, 1, 8), torch.zeros(1, 4, 1, 16)))
    return npu.npu_kv_rmsnorm_rope_cache_v2(kv, gamma, cos, cos, torch.tensor([0, 1]), *caches, **kwargs)


OTHER_REJECTIONS = [
    ("cache_mode", lambda: _kv_call(cache_mode="PA_NZ")),
    ("cache_mode", lambda: _kv_call(cache_mode="BSND")),
    ("k_cache", lambda: _kv_call(cache_mode="PA", caches=(torch.zeros(1, 4, 1, 8, dtype=torch.int8),
                                                          torch.zeros(1, 4, 1, 16)))),
    ("v", lambda: _kv_call(v=torch.randn(1, 1, 2, 16))),
    ("index", lambda: _kv_call(cache_mode="PA", caches=(torch.zeros(1, 1, 1, 8), torch.zeros(1, 1, 1, 16)))),
    ("pre_out", lambda: atb.npu_ring_mla(*(torch.randn(2, 1, 4) for _ in range(5)), torch.zeros(1),
                                         torch.tensor([2]), 1, 1, calc_type="calc_type_default")),
    ("mask_type", lambda: atb.npu_ring_mla(*(torch.randn(2, 1, 4) for _ in range(5)), torch.zeros(1),
                                           torch.tensor([2]), 1, 1, mask_type="mask_type_spec",
                                           calc_type="calc_type_first_ring")),
    ("slot_indices", lambda: atb._npu_reshape_and_cache(torch.ones(1, 1, 2), torch.ones(1, 1, 2),
                                                        torch.zeros(1, 2, 1, 2), torch.zeros(1, 2, 1, 2),
                                                        torch.tensor([2]))),
]


@pytest.mark.parametrize("arg,call", OTHER_REJECTIONS, ids=[f"{i}-{a}" for i, (a, _) in enumerate(OTHER_REJECTIONS)])
def test_cache_and_atb_rejections_name_the_argument(arg, call):
    with pytest.raises(ValueError, match=rf"\b{arg}="):
        call()


def test_mla_prolog_rejects_what_it_does_not_emulate():
    args = prolog_args()
    with pytest.raises(ValueError, match=r"\bweight_quant_mode=1"):
        npu.npu_mla_prolog_v3(**args, weight_quant_mode=1)
    with pytest.raises(ValueError, match=r"\bcache_mode='PA_NZ'"):   # documented, but NZ caches are not emulated
        npu.npu_mla_prolog_v3(**args, cache_mode="PA_NZ")


def test_format_cast_rejects_a_real_format_it_does_not_model():
    with pytest.raises(ValueError, match=r"\bacl_format=4 .*FRACTAL_Z is a real format"):
        npu.npu_format_cast(torch.ones(2, 2), 4)
    with pytest.raises(ValueError, match=r"\bcustomize_dtype="):
        npu.npu_format_cast(torch.ones(2, 2), 29, customize_dtype=1)

"""Fake kernels under FakeTensorMode; expected shapes are written from the META rules
of torch_npu/op_plugin/meta/_meta_registrations.py (2.13.0)."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from mla_graph.npu import ensure_npu_ops

ensure_npu_ops()
npu, atb = torch.ops.npu, torch.ops.atb
BF16, F32 = torch.bfloat16, torch.float32


def shapes(outs):
    outs = outs if isinstance(outs, tuple) else (outs,)
    assert all(isinstance(t, FakeTensor) for t in outs)
    return [(tuple(t.shape), t.dtype) for t in outs]


def e(*shape, dtype=BF16):
    return torch.empty(*shape, dtype=dtype)


FIA_CASES = [
    # (input_layout, query, key/value, kwargs, expected out shape, expected lse shape when on)
    ("BNSD", (2, 4, 1, 32), (6, 16, 32), dict(block_table=(2, 2), block_size=16, actual_seq_lengths_kv=[20, 5],
                                              num_key_value_heads=1), (2, 4, 1, 32), (2, 4, 1, 1)),
    ("BSH", (2, 3, 32), (2, 5, 8), dict(num_key_value_heads=2), (2, 3, 16), (2, 4, 3, 1)),
    ("TND", (7, 4, 8), (9, 4, 6), dict(actual_seq_lengths=[3, 7], actual_seq_lengths_kv=[4, 9]), (7, 4, 6),
     (7, 4, 1)),
    ("NTD_TND", (4, 7, 8), (4, 7, 8), dict(actual_seq_lengths=[7], actual_seq_lengths_kv=[7]), (7, 4, 8),
     (7, 4, 1)),
    ("TND_NTD", (7, 4, 8), (7, 4, 8), dict(actual_seq_lengths=[7], actual_seq_lengths_kv=[7]), (4, 7, 8),
     (7, 4, 1)),
    ("BNSD_NBSD", (2, 4, 3, 8), (2, 4, 5, 8), {}, (4, 2, 3, 8), (2, 4, 3, 1)),
    ("BSND_NBSD", (2, 3, 4, 8), (2, 5, 4, 8), {}, (4, 2, 3, 8), (2, 4, 3, 1)),
    ("BSH_NBSD", (2, 3, 32), (2, 5, 32), {}, (4, 2, 3, 8), (2, 4, 3, 1)),
    ("BNSD_BSND", (2, 4, 3, 8), (2, 4, 5, 8), {}, (2, 3, 4, 8), (2, 4, 3, 1)),
    ("BSND", (2, 3, 4, 8), (6, 16, 32), dict(block_table=(2, 2), block_size=16, actual_seq_lengths_kv=[3, 3]),
     (2, 3, 4, 8), (2, 4, 3, 1)),
]


@pytest.mark.parametrize("layout,q,kv,kwargs,out_shape,lse_shape", FIA_CASES)
@pytest.mark.parametrize("version", [1, 2])
def test_fia_fake_shapes(version, layout, q, kv, kwargs, out_shape, lse_shape):
    kwargs = dict(kwargs)
    with FakeTensorMode():
        if "block_table" in kwargs:
            kwargs["block_table"] = e(*kwargs["block_table"], dtype=torch.int32)
        query, key = e(*q), e(*kv)
        if version == 1:
            run = [npu.npu_fused_infer_attention_score(query, key, key, num_heads=4, input_layout=layout,
                                                       softmax_lse_flag=flag, **kwargs) for flag in (False, True)]
        else:
            renamed = {{"actual_seq_lengths": "actual_seq_qlen", "actual_seq_lengths_kv": "actual_seq_kvlen"}.get(k, k): v
                       for k, v in kwargs.items()}
            run = [npu.npu_fused_infer_attention_score_v2(query, key, key, num_query_heads=4, input_layout=layout,
                                                          return_softmax_lse=flag, **renamed) for flag in (False, True)]
    assert shapes(run[0]) == [(out_shape, BF16), ((0,), F32)]
    assert shapes(run[1]) == [(out_shape, BF16), (lse_shape, F32)]


def test_kv_rmsnorm_rope_cache_fakes():
    with FakeTensorMode():
        kv, gamma, cos = e(2, 1, 3, 24), e(16), e(2, 1, 3, 8)
        index, k_cache, ckv_cache = e(2, 3, dtype=torch.int64), e(2, 1, 6, 8), e(2, 1, 6, 16)
        args = (kv, gamma, cos, cos, index, k_cache, ckv_cache)
        v1 = npu.npu_kv_rmsnorm_rope_cache(*args)
        v2 = npu.npu_kv_rmsnorm_rope_cache_v2(*args)
        v2f = npu.npu_kv_rmsnorm_rope_cache_v2_functional(*args)
    rope, ckv = ((2, 1, 3, 8), BF16), ((2, 1, 3, 16), BF16)
    assert shapes(v1) == [((2, 1, 6, 8), BF16), ((2, 1, 6, 16), BF16), rope, ckv]
    assert shapes(v2) == [rope, ckv]
    assert shapes(v2f) == [rope, ckv, ((2, 1, 6, 8), BF16), ((2, 1, 6, 16), BF16)]


def test_rope_norm_scatter_fakes():
    with FakeTensorMode():
        x = e(2, 3, 4, 8, dtype=torch.float16)
        rope = npu.npu_interleave_rope(x, e(2, 1, 4, 8), e(2, 1, 4, 8))
        norm = npu.npu_rms_norm(x, e(4, 8, dtype=torch.float16))
        data, idx, upd = e(2, 3, 5, 2), e(2, dtype=torch.int64), e(2, 3, 1, 2)
        su, su_ = npu.scatter_update(data, idx, upd, -2), npu.scatter_update_(data, idx, upd, -2)
        nd_idx, nd_upd = e(2, 1, dtype=torch.int64), e(2, 3, 5, 2)
        nd, nd_ = npu.npu_scatter_nd_update(data, nd_idx, nd_upd), npu.npu_scatter_nd_update_(data, nd_idx, nd_upd)
    assert shapes(rope) == [((2, 3, 4, 8), torch.float16)]
    assert shapes(norm) == [((2, 3, 4, 8), torch.float16), ((2, 3, 1, 1), F32)]
    assert shapes(su) == shapes(nd) == [((2, 3, 5, 2), BF16)]
    assert su_ is data and nd_ is data


@pytest.mark.parametrize("token_shape,query_norm_flag", [((5, 32), False), ((2, 3, 32), True)])
def test_mla_prolog_v3_fakes(token_shape, query_norm_flag):
    lead = list(token_shape[:-1])
    with FakeTensorMode():
        weights = (e(32, 16), e(16, 2 * 12, dtype=torch.float16), e(2, 8, 12), e(32, 16))
        rope = e(*lead, 4)
        args = (e(*token_shape), *weights, e(16), e(12), rope, rope, e(2, 4, 1, 12), e(2, 4, 1, 4))
        index = e(*lead, dtype=torch.int64)
        v3 = npu.npu_mla_prolog_v3(*args, cache_index=index, query_norm_flag=query_norm_flag)
        v3f = npu.npu_mla_prolog_v3_functional(*args, cache_index=index, query_norm_flag=query_norm_flag)
    expected = [(tuple(lead + [2, 12]), BF16), (tuple(lead + [2, 4]), BF16), ((0,), F32),
                (tuple(lead + [16]) if query_norm_flag else (0,), torch.float16), ((0,), F32)]
    assert shapes(v3) == expected
    assert shapes(v3f) == expected + [((2, 4, 1, 12), BF16), ((2, 4, 1, 4), BF16)]


def test_atb_fakes():
    with FakeTensorMode():
        k = e(3, 2, 4)
        assert atb._npu_reshape_and_cache(k, k, e(2, 4, 2, 4), e(2, 4, 2, 4), e(3, dtype=torch.int32)) is None
        out = e(2, 4, 16)
        assert atb._npu_paged_attention_mla(e(2, 4, 24), e(5, 4, 1, 24), 1, 4, 0.1, e(2, 3, dtype=torch.int32),
                                            e(2, dtype=torch.int32), 16, out) is None
        ring = atb.npu_ring_mla(e(5, 4, 8), e(5, 4, 4), e(6, 4, 8), e(6, 4, 4), e(6, 4, 8), e(512, 512),
                                e(2, 2, dtype=torch.int32), 4, 4, calc_type="calc_type_first_ring")
    assert shapes(ring) == [((5, 4, 8), BF16), ((4, 5), F32)]

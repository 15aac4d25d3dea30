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
    # (input_layout, heads, query, key, value (None: key), kwargs, expected out shape, expected lse shape when on).
    # The token-major layouts have TND's documented limits: 8..128 heads, qk 192, v 128 or 192.
    ("BNSD", 4, (2, 4, 1, 32), (6, 16, 32), None, dict(block_table=(2, 2), block_size=16,
                                                       actual_seq_lengths_kv=[20, 5], num_key_value_heads=1),
     (2, 4, 1, 32), (2, 4, 1, 1)),
    ("BSH", 4, (2, 3, 32), (2, 5, 8), None, dict(num_key_value_heads=2), (2, 3, 16), (2, 4, 3, 1)),
    ("TND", 8, (7, 8, 192), (9, 8, 192), (9, 8, 128), dict(actual_seq_lengths=[3, 7], actual_seq_lengths_kv=[4, 9]),
     (7, 8, 128), (7, 8, 1)),
    ("NTD_TND", 8, (8, 7, 192), (8, 7, 192), None, dict(actual_seq_lengths=[7], actual_seq_lengths_kv=[7]),
     (7, 8, 192), (7, 8, 1)),
    ("TND_NTD", 8, (7, 8, 192), (7, 8, 192), (7, 8, 128), dict(actual_seq_lengths=[7], actual_seq_lengths_kv=[7]),
     (8, 7, 128), (7, 8, 1)),
    ("BNSD_NBSD", 4, (2, 4, 3, 8), (2, 4, 5, 8), None, {}, (4, 2, 3, 8), (2, 4, 3, 1)),
    ("BSND_NBSD", 4, (2, 3, 4, 8), (2, 5, 4, 8), None, {}, (4, 2, 3, 8), (2, 4, 3, 1)),
    ("BSH_NBSD", 4, (2, 3, 32), (2, 5, 32), None, {}, (4, 2, 3, 8), (2, 4, 3, 1)),
    ("BNSD_BSND", 4, (2, 4, 3, 8), (2, 4, 5, 8), None, {}, (2, 3, 4, 8), (2, 4, 3, 1)),
    ("BSND", 4, (2, 3, 4, 8), (6, 16, 32), None, dict(block_table=(2, 2), block_size=16,
                                                     actual_seq_lengths_kv=[3, 3]), (2, 3, 4, 8), (2, 4, 3, 1)),
]


@pytest.mark.parametrize("layout,heads,q,k,v,kwargs,out_shape,lse_shape", FIA_CASES)
@pytest.mark.parametrize("version", [1, 2])
def test_fia_fake_shapes(version, layout, heads, q, k, v, kwargs, out_shape, lse_shape):
    kwargs = dict(kwargs)
    with FakeTensorMode():
        if "block_table" in kwargs:
            kwargs["block_table"] = e(*kwargs["block_table"], dtype=torch.int32)
        query, key = e(*q), e(*k)
        value = key if v is None else e(*v)
        if version == 1:
            run = [npu.npu_fused_infer_attention_score(query, key, value, num_heads=heads, input_layout=layout,
                                                       softmax_lse_flag=flag, **kwargs) for flag in (False, True)]
        else:
            v2_names = {"actual_seq_lengths": "actual_seq_qlen", "actual_seq_lengths_kv": "actual_seq_kvlen"}
            renamed = {v2_names.get(name, name): arg for name, arg in kwargs.items()}
            run = [npu.npu_fused_infer_attention_score_v2(query, key, value, num_query_heads=heads,
                                                          input_layout=layout, return_softmax_lse=flag, **renamed)
                   for flag in (False, True)]
    assert shapes(run[0]) == [(out_shape, BF16), ((0,), F32)]
    assert shapes(run[1]) == [(out_shape, BF16), (lse_shape, F32)]


def test_fia_fake_mla_mode():
    # MLA decode within its limits: latent 512, rope 64, one KV head, block size 128, 16 heads (advisory).
    with FakeTensorMode():
        q, q_rope = e(2, 16, 1, 512), e(2, 16, 1, 64)
        cache, rope_cache = e(3, 128, 512), e(3, 128, 64)
        out, lse = npu.npu_fused_infer_attention_score(
            q, cache, cache, query_rope=q_rope, key_rope=rope_cache, block_table=e(2, 2, dtype=torch.int32),
            actual_seq_lengths_kv=[200, 5], num_heads=16, num_key_value_heads=1, input_layout="BNSD",
            block_size=128, softmax_lse_flag=True)
    assert shapes((out, lse)) == [((2, 16, 1, 512), BF16), ((2, 16, 1, 1), F32)]


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


@pytest.mark.parametrize("token_shape,query_norm_flag", [((5, 6144), False), ((2, 3, 6144), True)])
def test_mla_prolog_v3_fakes(token_shape, query_norm_flag):
    # Within the documented dims (He 6144, Hcq 1536, N 2, D 128, Dr 64, Hckv 512, block size 16).
    lead = list(token_shape[:-1])
    with FakeTensorMode():
        weights = (e(6144, 1536), e(1536, 2 * (128 + 64)), e(2, 128, 512), e(6144, 512 + 64))
        rope = e(*lead, 64)
        args = (e(*token_shape), *weights, e(1536), e(512), rope, rope, e(2, 16, 1, 512), e(2, 16, 1, 64))
        index = e(*lead, dtype=torch.int64)
        v3 = npu.npu_mla_prolog_v3(*args, cache_index=index, query_norm_flag=query_norm_flag)
        v3f = npu.npu_mla_prolog_v3_functional(*args, cache_index=index, query_norm_flag=query_norm_flag)
    expected = [(tuple(lead + [2, 512]), BF16), (tuple(lead + [2, 64]), BF16), ((0,), F32),
                (tuple(lead + [1536]) if query_norm_flag else (0,), BF16), ((0,), F32)]
    assert shapes(v3) == expected
    assert shapes(v3f) == expected + [((2, 16, 1, 512), BF16), ((2, 16, 1, 64), BF16)]


def test_format_cast_fake_keeps_shape_and_dtype():
    with FakeTensorMode():
        w = e(6, 4).t()
        nz = npu.npu_format_cast(w, 29)
    assert shapes(nz) == [((4, 6), BF16)] and nz.is_contiguous()   # META: self.new_empty(self.shape)


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

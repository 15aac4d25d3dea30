"""The emulated kernels reject what the documented limits of the real ones reject (mla_graph/npu/limits.py).

One case per documented limit: the call raises KernelLimitError (a ValueError) whose message names the
argument, the offending value, the allowed values and the doc line. Calls inside the limits (an advisory
one included) run and compute the right values against an oracle written here."""
import math

import pytest
import torch
import torch.nn.functional as F
from npu_tolerance import assert_ulps_close
from prolog_args import NZ_WEIGHTS, PrologDims, prolog_args
from torch._subclasses.fake_tensor import FakeTensorMode

from mla_graph.npu import ensure_npu_ops
from mla_graph.npu.formats import npu_format
from mla_graph.npu.limits import KernelLimitError

ensure_npu_ops()
npu = torch.ops.npu
BF16 = torch.bfloat16
TRIU_2048 = torch.triu(torch.ones(2048, 2048, dtype=torch.int8), diagonal=1)
MLA_LIMITS = "MLA constraints, L8176"


def rand(*shape, dtype=BF16):
    return torch.randn(*shape).to(dtype)


def assert_rejected(call, arg: str, value: str, allowed: str, line: str) -> None:
    """`value` is the offending value's repr, as the message shows it."""
    with pytest.raises(KernelLimitError) as info:
        call()
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert f"{arg}={value} is outside the documented limits" in message, message
    assert f"allowed: {allowed}" in message, message
    assert line in message, message


def mla(*, dtype=BF16, heads=32, tokens=1, latent=512, rope=64, block_size=16, paged=True, kv_heads=1,
        kv_lens=(20, 5)):
    """FIA in MLA mode (BNSD decode over a paged latent cache), one KV head: the arguments."""
    b, blocks = 2, 4
    kwargs = dict(query_rope=rand(b, heads, tokens, rope, dtype=dtype), num_heads=heads,
                  num_key_value_heads=kv_heads, scale=1 / math.sqrt(latent + rope), input_layout="BNSD",
                  actual_seq_lengths_kv=list(kv_lens))
    if paged:
        cache = rand(blocks, kv_heads, block_size, latent, dtype=dtype)
        kwargs.update(key_rope=rand(blocks, kv_heads, block_size, rope, dtype=dtype), block_size=block_size,
                      block_table=torch.tensor([[3, 1], [0, 2]], dtype=torch.int32))
    else:
        cache = rand(b, kv_heads, max(kv_lens), latent, dtype=dtype)
        kwargs.update(key_rope=rand(b, kv_heads, max(kv_lens), rope, dtype=dtype))
    return rand(b, heads, tokens, latent, dtype=dtype), cache, kwargs


def run_mla(**overrides):
    q, cache, kwargs = mla(**overrides)
    return npu.npu_fused_infer_attention_score(q, cache, cache, **kwargs)


def run_tnd(*, dtype=BF16, heads=8, kv_heads=0, qk=192, v=128, sparse_mode=3, mask=True, q_lens=(3, 5),
            kv_lens=(3, 5), version=1):
    """FIA with input_layout TND and no rope (decompressed prefill)."""
    n_kv = kv_heads or heads
    q = rand(sum(q_lens), heads, qk, dtype=dtype)
    k, val = rand(sum(kv_lens), n_kv, qk, dtype=dtype), rand(sum(kv_lens), n_kv, v, dtype=dtype)
    cum_q, cum_kv = torch.tensor(q_lens).cumsum(0).tolist(), torch.tensor(kv_lens).cumsum(0).tolist()
    common = dict(atten_mask=TRIU_2048 if mask else None, num_key_value_heads=kv_heads, input_layout="TND",
                  sparse_mode=sparse_mode)
    if version == 2:
        return npu.npu_fused_infer_attention_score_v2(q, k, val, actual_seq_qlen=cum_q, actual_seq_kvlen=cum_kv,
                                                      num_query_heads=heads, **common)
    return npu.npu_fused_infer_attention_score(q, k, val, actual_seq_lengths=cum_q, actual_seq_lengths_kv=cum_kv,
                                               num_heads=heads, **common)


FIA_CASES = [
    # (id, call, arg, value repr, allowed, doc line)
    ("mla-dtype", lambda: run_mla(dtype=torch.float32), "query.dtype", "torch.float32", "float16, bfloat16",
     "L8105"),
    ("mla-query-tokens", lambda: run_mla(tokens=17), "query tokens per request", "17", "1..16", MLA_LIMITS),
    ("mla-latent", lambda: run_mla(latent=256), "query D", "256", "512 (the latent)", MLA_LIMITS),
    ("mla-rope", lambda: run_mla(rope=32), "query_rope D", "32", "64", MLA_LIMITS),
    ("mla-key-heads", lambda: run_mla(kv_heads=2), "key N", "2", "1 (one latent head)", "L8177"),
    ("mla-block-size", lambda: run_mla(block_size=64), "block_size", "64", "one of (16, 128)", "L8182"),
    ("mla-no-block-table", lambda: run_mla(paged=False), "block_table", "None",
     "a block table (PageAttention is mandatory in MLA mode)", "L8182"),
    ("tnd-dtype", lambda: run_tnd(dtype=torch.float16), "query.dtype", "torch.float16", "bfloat16",
     "L8193-L8199"),
    ("tnd-fp32", lambda: run_tnd(dtype=torch.float32), "query.dtype", "torch.float32", "bfloat16", "L8193-L8199"),
    ("tnd-heads", lambda: run_tnd(heads=4), "num_heads", "4", "one of (8, 16, 32, 64, 128)", "L8193-L8199"),
    ("tnd-heads-v2", lambda: run_tnd(heads=4, version=2), "num_query_heads", "4", "one of (8, 16, 32, 64, 128)",
     "L8193-L8199"),
    ("tnd-gqa", lambda: run_tnd(heads=16, kv_heads=8), "num_key_value_heads", "8", "16 (Q_N = K_N = V_N)",
     "L8193-L8199"),
    ("tnd-qk", lambda: run_tnd(qk=128), "query/key D", "128", "192", "L8193-L8199"),
    ("tnd-v", lambda: run_tnd(v=64), "value D", "64", "one of (128, 192)", "L8193-L8199"),
    ("tnd-sparse3-no-mask", lambda: run_tnd(mask=False), "sparse_mode", "3", "0 without atten_mask or 3 with it",
     "L8193-L8199"),
    ("tnd-sparse2", lambda: run_tnd(sparse_mode=2), "sparse_mode", "2", "0 without atten_mask or 3 with it",
     "L8193-L8199"),
    ("tnd-q-longer-than-kv", lambda: run_tnd(kv_lens=(2, 5)), "actual_seq_lengths", "[(3, 2)]",
     "per request <= its actual_seq_lengths_kv", "L8199"),
    ("tnd-q-longer-than-kv-v2", lambda: run_tnd(kv_lens=(3, 4), version=2), "actual_seq_qlen", "[(5, 4)]",
     "per request <= its actual_seq_lengths_kv", "L8199"),
    ("bnsd-fp32", lambda: npu.npu_fused_infer_attention_score(*(rand(1, 2, 3, 8, dtype=torch.float32),) * 3,
                                                              num_heads=2, input_layout="BNSD"),
     "query.dtype", "torch.float32", "float16, bfloat16, int8", "query, L8065"),
    ("bsh-fp32-v2", lambda: npu.npu_fused_infer_attention_score_v2(*(rand(1, 3, 16, dtype=torch.float32),) * 3,
                                                                   num_query_heads=2),
     "query.dtype", "torch.float32", "float16, bfloat16, int8", "query, L8589"),
]


@pytest.mark.parametrize("call,arg,value,allowed,line", [c[1:] for c in FIA_CASES], ids=[c[0] for c in FIA_CASES])
def test_fia_rejects_outside_documented_limits(call, arg, value, allowed, line):
    torch.manual_seed(0)
    assert_rejected(call, arg, value, allowed, line)


def test_fia_limits_hold_at_trace_time():
    # The fake kernels check the shape-level limits too: T above 65536 costs nothing on fake tensors.
    with FakeTensorMode():
        q, k, v = (torch.empty(65537, 8, d, dtype=BF16) for d in (192, 192, 128))
        assert_rejected(lambda: npu.npu_fused_infer_attention_score(
            q, k, v, actual_seq_lengths=[65537], actual_seq_lengths_kv=[65537], num_heads=8, input_layout="TND"),
            "T", "65537", "<= 65536", "L8193-L8199")
        assert_rejected(lambda: run_mla(block_size=64), "block_size", "64", "one of (16, 128)", "L8182")


def test_air_fia_rejects_like_the_npu_kernel():
    from mla_graph.npu.air_ops import ensure_air_ops   # torchair's FIA, emulated through npu's
    ensure_air_ops()
    q = rand(1, 2, 3, 8, dtype=torch.float32)
    assert_rejected(lambda: torch.ops.air.npu_fused_infer_attention_score(q, q, q, num_heads=2, input_layout="BNSD"),
                    "query.dtype", "torch.float32", "float16, bfloat16, int8", "L8065")


def test_mla_with_16_heads_is_advisory_and_computes_attention():
    # 16 heads per rank (DeepSeek-V3 at TP 8) is outside L8176's (32, 64, 128) but what vllm-ascend runs.
    torch.manual_seed(1)
    heads, block, kv_lens = 16, 128, (130, 7)
    q, cache, kwargs = mla(heads=heads, block_size=block, kv_lens=kv_lens)
    out, lse = npu.npu_fused_infer_attention_score(q, cache, cache, softmax_lse_flag=True, **kwargs)
    assert out.shape == (2, heads, 1, 512) and out.dtype == BF16
    for b, length in enumerate(kv_lens):
        rows = torch.cat([cache[kwargs["block_table"][b].long(), 0].reshape(-1, 512),
                          kwargs["key_rope"][kwargs["block_table"][b].long(), 0].reshape(-1, 64)], -1)[:length]
        keys = rows.float()[None].expand(heads, -1, -1)
        query = torch.cat([q[b], kwargs["query_rope"][b]], -1).float()
        scores = query @ keys.transpose(1, 2) * kwargs["scale"]
        expected = F.scaled_dot_product_attention(query, keys, keys[..., :512], scale=kwargs["scale"])
        assert_ulps_close(out[b], expected)
        assert_ulps_close(lse[b, :, :, 0], torch.logsumexp(scores, -1))


PROLOG_CASES = [
    # (id, prolog_args keywords, call keywords, arg, value repr, allowed, doc line)
    ("token-dtype", dict(token_dtype=torch.float16), {}, "token_x.dtype", "torch.float16",
     "bfloat16 (int8 when quantized)", "L9604"),
    ("hidden-deepseek-v2", dict(dims=PrologDims(hidden=5120)), {}, "He (hidden size)", "5120",
     "one of (7168, 7680, 6144)", "L9652"),
    ("q-lora", dict(dims=PrologDims(q_lora=512)), {}, "Hcq (q_lora_rank)", "512", "1536", "L9654"),
    ("heads", dict(dims=PrologDims(heads=3)), {}, "N (heads)", "3", "one of (1, 2, 4, 8, 16, 32, 64, 128)", "L9655"),
    ("latent", dict(dims=PrologDims(latent=256)), {}, "Hckv (kv_lora_rank)", "256", "512", "L9657"),
    ("nope", dict(dims=PrologDims(nope=64)), {}, "D (qk_nope_head_dim)", "64", "128", "L9659"),
    ("rope", dict(dims=PrologDims(rope=32)), {}, "Dr (qk_rope_head_dim)", "32", "64", "L9660"),
    ("block-size", dict(dims=PrologDims(block_size=64, blocks=1)), {}, "BlockSize", "64", "one of (16, 128)",
     "L9663"),
    ("cache-mode", {}, dict(cache_mode="PA"), "cache_mode", "'PA'", "one of ('PA_BSND', 'PA_NZ')", "L9628"),
    *[(f"{w}-not-nz", dict(nz=tuple(n for n in NZ_WEIGHTS if n != w)), {}, f"{w} format", "2",
       "FRACTAL_NZ (29): cast once with npu_format_cast(w, 29)", "L9605-L9608") for w in NZ_WEIGHTS],
    ("cache-index-negative", {}, dict(cache_index=torch.tensor([4, -1, 9])), "cache_index", "(-1, 9)",
     "every value in [0, 32)", "L9616"),
    ("cache-index-past-cache", {}, dict(cache_index=torch.tensor([0, 32, 9])), "cache_index", "(0, 32)",
     "every value in [0, 32)", "L9616"),
]


@pytest.mark.parametrize("functional", [False, True], ids=["v3", "v3_functional"])
@pytest.mark.parametrize("make,given,arg,value,allowed,line", [c[1:] for c in PROLOG_CASES],
                         ids=[c[0] for c in PROLOG_CASES])
def test_mla_prolog_rejects_outside_documented_limits(functional, make, given, arg, value, allowed, line):
    op = npu.npu_mla_prolog_v3_functional if functional else npu.npu_mla_prolog_v3
    args = {**prolog_args(**make), **given}
    kv_before = args["kv_cache"].clone()
    assert_rejected(lambda: op(**args), arg, value, allowed, line)
    assert torch.equal(args["kv_cache"], kv_before)   # rejected before any write


def test_mla_prolog_shape_limits_hold_at_trace_time():
    args = prolog_args(PrologDims(hidden=5120))
    with FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v) for k, v in args.items()}
        assert_rejected(lambda: npu.npu_mla_prolog_v3(**fake), "He (hidden size)", "5120",
                        "one of (7168, 7680, 6144)", "L9652")


def test_mla_prolog_at_the_edges_of_its_limits_writes_the_cache():
    # He 7680, one head, block size 128, and the first and last cache slots.
    dims = PrologDims(tokens=2, hidden=7680, heads=1, block_size=128, blocks=1)
    args = {**prolog_args(dims, seed=3), "cache_index": torch.tensor([127, 0])}
    kv_before = args["kv_cache"].clone()
    npu.npu_mla_prolog_v3(**args)
    ckv = args["token_x"].float() @ args["weight_dkv_kr"].float()[:, :dims.latent]
    gamma = args["rmsnorm_gamma_ckv"].float()
    expected = ckv * torch.rsqrt(ckv.pow(2).mean(-1, keepdim=True) + 1e-5) * gamma
    flat, before = args["kv_cache"].view(-1, dims.latent), kv_before.view(-1, dims.latent)
    assert_ulps_close(flat[[127, 0]], expected)
    assert torch.equal(flat[1:127], before[1:127])


def test_format_cast_rejects_an_unknown_format():
    assert_rejected(lambda: npu.npu_format_cast(torch.ones(2, 2), 7), "acl_format", "7",
                    "an ACL format code, one of (0, 1, 2, 3, 4,", "acl_format, L1283")


def test_format_cast_keeps_values_and_records_the_format():
    w = torch.randn(4, 6).to(BF16).t()
    nz = npu.npu_format_cast(w, 29)
    assert nz is not w and nz.is_contiguous() and torch.equal(nz, w)
    assert (npu_format(nz), npu_format(w)) == (29, 2)
    nz.copy_(torch.zeros_like(nz))   # an in-place refresh keeps the tensor, and its format
    assert npu_format(nz) == 29 and npu_format(nz.clone()) == 2
    assert npu_format(npu.npu_format_cast(nz, 2)) == 2

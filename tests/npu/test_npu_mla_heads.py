"""FIA in MLA mode takes 128 query heads over one latent head (DeepSeek-V3 at TP 1); plain GQA caps at 64."""
import pytest
import torch

from mla_graph.npu import ensure_npu_ops

LATENT, ROPE, BLOCK = 512, 64, 16   # MLA mode's documented dims (limits.fia_mla)


def _fia(heads, with_rope):
    ensure_npu_ops()
    bf16 = torch.bfloat16
    q = torch.randn(2, heads, 1, LATENT, dtype=bf16)
    cache = torch.randn(4, 1, BLOCK, LATENT, dtype=bf16)
    kwargs = dict(block_table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32), actual_seq_lengths_kv=[20, 7],
                  num_heads=heads, input_layout="BNSD", num_key_value_heads=1, block_size=BLOCK, scale=0.04)
    if with_rope:
        kwargs.update(query_rope=torch.randn(2, heads, 1, ROPE, dtype=bf16),
                      key_rope=torch.randn(4, 1, BLOCK, ROPE, dtype=bf16))
    return torch.ops.npu.npu_fused_infer_attention_score(q, cache, cache, **kwargs)[0]


def test_mla_mode_accepts_128_heads():
    out = _fia(128, with_rope=True)
    assert out.shape == (2, 128, 1, LATENT)


def test_plain_gqa_rejects_ratio_above_64():
    with pytest.raises(ValueError, match="num_key_value_heads.*<= 64"):
        _fia(128, with_rope=False)

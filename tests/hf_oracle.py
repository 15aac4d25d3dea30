"""Hugging Face's DeepseekV3Attention as an independent oracle for our definition."""
from __future__ import annotations

import torch

from mla_graph.config import MLAConfig


def hf_attention(config: MLAConfig, dtype: torch.dtype):
    """A DeepseekV3Attention and its rotary embedding for our config (random weights)."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3Attention, DeepseekV3RotaryEmbedding)

    fields = config.to_hf()
    rope = fields.pop("rope_scaling", None)
    rope_parameters = {"rope_type": "default", "rope_theta": config.rope_theta}
    if rope is not None:
        rope = dict(rope)
        rope.pop("type")
        rope_parameters = {"rope_type": "yarn", "rope_theta": config.rope_theta, **rope}
    hf_config = DeepseekV3Config(**fields, rope_parameters=rope_parameters, rope_interleave=True,
                                 attention_bias=False, attention_dropout=0.0)
    hf_config._attn_implementation = "eager"
    attn = DeepseekV3Attention(hf_config, layer_idx=0).to(dtype)
    rotary = DeepseekV3RotaryEmbedding(hf_config)
    return attn, rotary


def hf_prefill(attn, rotary, hidden_states: torch.Tensor) -> torch.Tensor:
    """One request, all tokens new: hidden_states [S, hidden] -> [S, hidden]."""
    S = hidden_states.shape[0]
    x = hidden_states.unsqueeze(0)
    position_ids = torch.arange(S).unsqueeze(0)
    cos, sin = rotary(x, position_ids)
    mask = torch.full((S, S), float("-inf"), dtype=x.dtype).triu(1)[None, None]
    out, _ = attn(x, (cos, sin), mask)
    return out[0]

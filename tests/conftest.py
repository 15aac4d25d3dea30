import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from mla_graph import MLAConfig, YarnScaling  # noqa: E402

# Tiny configs with the structure of the real models: V3-like (q_lora, yarn with mscale 1.0)
# and V2-Lite-like (no q_lora, yarn with mscale 0.707). v_head_dim differs from qk_nope in V3_TINY.
V3_TINY = MLAConfig(hidden_size=64, num_heads=4, q_lora_rank=32, kv_lora_rank=48, qk_nope_head_dim=16,
                    qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=1024,
                    rope_scaling=YarnScaling(factor=8, original_max_position_embeddings=128, beta_fast=32,
                                             beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
                    name="v3-tiny")
V2_LITE_TINY = MLAConfig(hidden_size=48, num_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16,
                         qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=1024,
                         rope_scaling=YarnScaling(factor=8, original_max_position_embeddings=128, beta_fast=32,
                                                  beta_slow=1, mscale=0.707, mscale_all_dim=0.707),
                         name="v2-lite-tiny")
CONFIGS = {"v3": V3_TINY, "v2lite": V2_LITE_TINY}
# The smallest configs the NPU kernels' documented limits admit (mla_graph/npu/limits.py): latent
# 512, rope 64, nope 128, v 128 (FIA MLA and TND), and for V3 the fused prolog's hidden 6144 and
# q_lora 1536. Few heads keep them fast on a CPU (FIA MLA's 32/64/128 heads is advisory). Yarn with
# mscale != mscale_all_dim, so the mscale factor is not 1. The tiny configs above fit none of the
# kernels: their npu/torchair lowerings take the fallbacks, which is what they test now.
V3_NPU = MLAConfig(hidden_size=6144, num_heads=8, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                   qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=2048,
                   rope_scaling=YarnScaling(factor=8, original_max_position_embeddings=256, beta_fast=32,
                                            beta_slow=1, mscale=1.0, mscale_all_dim=0.8),
                   name="v3-npu")
V2_LITE_NPU = MLAConfig(hidden_size=512, num_heads=8, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
                        qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=2048,
                        rope_scaling=YarnScaling(factor=8, original_max_position_embeddings=256, beta_fast=32,
                                                 beta_slow=1, mscale=0.707, mscale_all_dim=1.0),
                        name="v2-lite-npu")

# Whole-layer tolerances (rtol, atol) against an independent implementation.
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 5e-2)}


@pytest.fixture(params=["v3", "v2lite"])
def config(request) -> MLAConfig:
    return CONFIGS[request.param]


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Random weights, norm gammas included (ones would hide a missing gamma)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_((torch.randn(p.shape, generator=gen) * std + (1.0 if p.dim() == 1 else 0.0)).to(p.dtype))
    return module.requires_grad_(False)

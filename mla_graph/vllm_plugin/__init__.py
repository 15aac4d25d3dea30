"""vLLM plugin: DeepSeek-V2/V3 MLA layers run through mla-graph's lowered module.

Entry point (group `vllm.general_plugins`): `mla_graph.vllm_plugin:register`. It does nothing
unless MLA_GRAPH_VLLM=1; then it checks that the installed vLLM is one whose MLA layer it knows
(versions.py), registers the op the layer runs as (op.py), and registers `MLAGraphAttention` as
the out-of-tree replacement of vLLM's pluggable layer "multi_head_latent_attention"
(MultiHeadLatentAttentionWrapper), ahead of any other (install.py), so every DeepSeek MLA layer
vLLM builds afterwards is ours. Why this integration point: docs/vllm.md.
"""
from __future__ import annotations

import logging

from ..envflags import env_flag

ENABLE_ENV = "MLA_GRAPH_VLLM"
logger = logging.getLogger("mla_graph.vllm")


def enabled() -> bool:
    return env_flag(ENABLE_ENV)


def register() -> bool:
    """vLLM calls this in every process. Returns whether the replacement is registered."""
    if not enabled():
        return False
    from .install import install
    install()
    return True

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
import os

ENABLE_ENV = "MLA_GRAPH_VLLM"
logger = logging.getLogger("mla_graph.vllm")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def enabled() -> bool:
    value = os.environ.get(ENABLE_ENV, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{ENABLE_ENV}={os.environ[ENABLE_ENV]!r}; expected one of {_TRUE + _FALSE[1:]}")


def register() -> bool:
    """vLLM calls this in every process. Returns whether the replacement is registered."""
    if not enabled():
        return False
    from .install import install
    install()
    return True

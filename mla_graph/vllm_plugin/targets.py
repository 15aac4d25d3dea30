"""Which mla-graph target runs each phase, from vLLM's configuration.

Order of precedence: MLA_GRAPH_VLLM_TARGET (or additional_config["mla_graph"]["target"]) names
the target of every phase; otherwise "npu" on an Ascend platform (vllm-ascend) and "reference"
elsewhere. Decode alone runs "torchair" when vllm-ascend's torchair graph mode is enabled
(additional_config["torchair_graph_config"]["enabled"]) or
additional_config["mla_graph"]["decode_target"] names one.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

from ..targets import TARGETS

TARGET_ENV = "MLA_GRAPH_VLLM_TARGET"


def choose_targets(additional_config: Mapping[str, Any] | None, device_type: str) -> dict[str, str]:
    """{"prefill": t, "mixed": t, "decode": t'} for this vLLM configuration."""
    extra = dict(additional_config or {})
    ours = extra.get("mla_graph") or {}
    if not isinstance(ours, Mapping):
        raise ValueError(f"additional_config['mla_graph'] must be a dict, got {ours!r}")
    base = os.environ.get(TARGET_ENV) or ours.get("target") or ("npu" if device_type == "npu" else "reference")
    torchair = extra.get("torchair_graph_config") or {}
    decode = ours.get("decode_target") or ("torchair" if torchair.get("enabled") else base)
    for where, name in (("target", base), ("decode target", decode)):
        if name not in TARGETS:
            raise ValueError(f"mla-graph {where} {name!r} (from {TARGET_ENV}, additional_config or "
                             f"torchair_graph_config) is not a target; known: {', '.join(TARGETS)}")
    return {"prefill": base, "mixed": base, "decode": decode}

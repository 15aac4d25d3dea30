"""Which mla-graph target runs each phase, from vLLM's configuration.

Order of precedence, every phase: MLA_GRAPH_VLLM_TARGET, then additional_config["mla_graph"]
["target"], then "npu" on an Ascend platform (vllm-ascend) and "reference" elsewhere. Decode alone:
MLA_GRAPH_VLLM_DECODE_TARGET, then additional_config["mla_graph"]["decode_target"], then the
target of every phase.

vllm-ascend 0.30 validates its additional_config and refuses keys it does not know
("mla_graph" among them), so beside it the environment variables are the way to choose.
"torchair_graph_config" was vllm-ascend's torchair graph mode, removed in its v0.12.0rc1 (0.30
refuses the key, 0.23 ignores it): naming it is an error here that says what to set instead,
rather than a switch that no vllm-ascend release accepts.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

from ..targets import TARGETS

TARGET_ENV = "MLA_GRAPH_VLLM_TARGET"
DECODE_TARGET_ENV = "MLA_GRAPH_VLLM_DECODE_TARGET"


def choose_targets(additional_config: Mapping[str, Any] | None, device_type: str) -> dict[str, str]:
    """{"prefill": t, "mixed": t, "decode": t'} for this vLLM configuration."""
    extra = dict(additional_config or {})
    ours = extra.get("mla_graph") or {}
    if not isinstance(ours, Mapping):
        raise ValueError(f"additional_config['mla_graph'] must be a dict, got {ours!r}")
    if "torchair_graph_config" in extra:
        raise ValueError(f"additional_config['torchair_graph_config'] ({extra['torchair_graph_config']!r}) is "
                         f"vllm-ascend's torchair graph mode, removed in vllm-ascend v0.12.0rc1 (its 0.30 config "
                         f"refuses the key); for mla-graph's torchair decode set {DECODE_TARGET_ENV}=torchair")
    base = os.environ.get(TARGET_ENV) or ours.get("target") or ("npu" if device_type == "npu" else "reference")
    decode = os.environ.get(DECODE_TARGET_ENV) or ours.get("decode_target") or base
    for where, name, env in (("target", base, TARGET_ENV), ("decode target", decode, DECODE_TARGET_ENV)):
        if name not in TARGETS:
            raise ValueError(f"mla-graph {where} {name!r} (from {env} or additional_config['mla_graph']) is not a "
                             f"target; known: {', '.join(TARGETS)}")
    return {"prefill": base, "mixed": base, "decode": decode}

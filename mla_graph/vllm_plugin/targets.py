"""Which mla-graph target runs each phase, from vLLM's configuration.

Order of precedence, every phase: MLA_GRAPH_VLLM_TARGET, then additional_config["mla_graph"]
["target"], then the platform's default (DEFAULT_TARGETS): "npu" on an Ascend platform
(vllm-ascend), "cpu" on vLLM's CPU platform (the fastest target there), "reference" elsewhere (the
cpu target's kernel is written for host tensors). Decode alone:
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
# vLLM's platform device type -> the target every phase gets when nothing is set, and why
DEFAULT_TARGETS = {
    "npu": ("npu", "the Ascend platform's default: its eager NPU kernels"),
    "cpu": ("cpu", "the CPU platform's default: the fastest target there (per-request GEMM attention)"),
}
OTHER_PLATFORMS = ("reference", "the default on a platform with no target of its own")


def default_target(device_type: str) -> tuple[str, str]:
    """(target, why) for a platform when neither the environment nor additional_config names one."""
    return DEFAULT_TARGETS.get(device_type, OTHER_PLATFORMS)


def why_targets(additional_config: Mapping[str, Any] | None, device_type: str) -> str:
    """Where choose_targets' choice came from, for the log."""
    return choose_targets_and_why(additional_config, device_type)[1]


def choose_targets(additional_config: Mapping[str, Any] | None, device_type: str) -> dict[str, str]:
    """{"prefill": t, "mixed": t, "decode": t'} for this vLLM configuration."""
    return choose_targets_and_why(additional_config, device_type)[0]


def choose_targets_and_why(additional_config: Mapping[str, Any] | None,
                           device_type: str) -> tuple[dict[str, str], str]:
    """The targets per phase and, for the log, where each came from (the one place the precedence is)."""
    extra = dict(additional_config or {})
    ours = extra.get("mla_graph") or {}
    if not isinstance(ours, Mapping):
        raise ValueError(f"additional_config['mla_graph'] must be a dict, got {ours!r}")
    if "torchair_graph_config" in extra:
        raise ValueError(f"additional_config['torchair_graph_config'] ({extra['torchair_graph_config']!r}) is "
                         f"vllm-ascend's torchair graph mode, removed in vllm-ascend v0.12.0rc1 (its 0.30 config "
                         f"refuses the key); for mla-graph's torchair decode set {DECODE_TARGET_ENV}=torchair")
    if os.environ.get(TARGET_ENV):
        base, where = os.environ[TARGET_ENV], f"{TARGET_ENV}={os.environ[TARGET_ENV]}"
    elif ours.get("target"):
        base, where = ours["target"], "additional_config['mla_graph']['target']"
    else:
        base, why = default_target(device_type)
        where = f"{why} (vLLM platform {device_type!r})"
    decode = base
    if os.environ.get(DECODE_TARGET_ENV):
        decode = os.environ[DECODE_TARGET_ENV]
        where += f"; decode: {DECODE_TARGET_ENV}={decode}"
    elif ours.get("decode_target"):
        decode = ours["decode_target"]
        where += "; decode: additional_config['mla_graph']['decode_target']"
    for what, name, env in (("target", base, TARGET_ENV), ("decode target", decode, DECODE_TARGET_ENV)):
        if name not in TARGETS:
            raise ValueError(f"mla-graph {what} {name!r} (from {env} or additional_config['mla_graph']) is not a "
                             f"target; known: {', '.join(TARGETS)}")
    return {"prefill": base, "mixed": base, "decode": decode}, where

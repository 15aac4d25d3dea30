"""The documented kernel limits (mla_graph/npu/limits.py) as check findings, for FIA in MLA mode.

The emulated kernels enforce the hard limits when a graph is traced, so a traced graph only
carries the advisory ones: limits vllm-ascend's production use contradicts (FIA MLA with 16 heads
per rank for DeepSeek-V3 at TP 8, where the doc lists 32, 64, 128). Those are notes with the
reason, never errors. A hard violation here means a node's fake value did not come from our
kernel (a hand-built graph): it is an error, as the kernel would raise.

Each FIA node (npu:: v1 and v2, torchair's air::) is mapped onto the emulated kernel's own FiaCall
and judged by the kernel's own fia_limits.violations, so the check and the kernel agree.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.fx import GraphModule, Node

from .report import Finding

_LENGTHS = ("actual_seq_lengths", "actual_seq_lengths_kv", "actual_seq_qlen", "actual_seq_kvlen")


def _call_builders() -> dict[str, Callable[..., Any]]:
    from ..npu.fia_ops import _v1_call, _v2_call   # the kernel's own argument mapping
    return {"npu.npu_fused_infer_attention_score.default": _v1_call,
            "air.npu_fused_infer_attention_score.default": _v1_call,
            "npu.npu_fused_infer_attention_score_v2.default": _v2_call}


def kernel_limit_findings(gm: GraphModule) -> tuple[list[Finding], int]:
    """(findings, number of FIA nodes in MLA mode judged)."""
    from ..npu import fia_layout, fia_limits

    builders = _call_builders()
    findings, judged = [], 0
    for node in gm.graph.nodes:
        build = builders.get(str(node.target)) if node.op == "call_function" else None
        arguments = _fake_arguments(node) if build is not None else None
        if arguments is None or arguments.get("query_rope") is None:
            continue   # not FIA, no fake values, or not MLA mode
        try:
            call = build(**arguments)
            layout = fia_layout.parse_layout(call.op, call.input_layout, call.query)
            violations = fia_limits.violations(call, layout, call.num_kv_heads or call.num_heads)
        except ValueError as error:   # the kernel's own argument checks
            findings.append(Finding("kernel-limit", node.name, str(node.target), f"the emulated kernel rejects "
                                    f"the call: {error}", "change the arguments to what the kernel accepts"))
            continue
        judged += 1
        findings += [_finding(node, v) for v in violations]
    return findings, judged


def _finding(node: Node, violation) -> Finding:
    if violation.advisory:
        return Finding("kernel-limit", node.name, str(node.target), f"{violation.message()}; advisory: "
                       f"{violation.advisory}", "nothing to change unless the kernel rejects it on the device",
                       severity="note")
    return Finding("kernel-limit", node.name, str(node.target), violation.message(),
                   "lower this attention to a form the kernel admits (the passes route around the limits)")


def _fake_arguments(node: Node) -> dict[str, Any] | None:
    """The node's arguments by schema name, FX nodes replaced by their fake values; length tensors
    (torchair's air:: form) become None: their values are data, unknown to a check."""
    schema = node.target._schema
    arguments: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            given = node.args[i]
        elif arg.name in node.kwargs:
            given = node.kwargs[arg.name]
        else:
            continue
        missing = []
        value = torch.fx.node.map_arg(given, lambda n: n.meta.get("val") if "val" in n.meta else missing.append(n))
        if missing:
            return None
        arguments[arg.name] = None if arg.name in _LENGTHS and isinstance(value, torch.Tensor) else value
    return arguments

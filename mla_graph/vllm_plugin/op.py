"""`mla_graph::vllm_mla_forward`: the lowered MLA as one op vLLM's torch.compile cannot see into.

vLLM's compile warm-up traces the model with no attention metadata; Python inside the layer would
be traced once, down that branch, and its result baked into the graph. So the layer's forward is
only this op, registered the way vLLM registers its own attention ops
(`vllm::unified_mla_attention_with_output`: `direct_register_custom_op`, a fake kernel, the output
mutated in place, the layer found by name in the forward context) and added beside them to the
ops vLLM splits its graph at (`CompilationConfig._attention_ops`, hence `splitting_ops`). It runs
eagerly on every step, with that step's metadata.
"""
from __future__ import annotations

import torch
from vllm.forward_context import get_forward_context
from vllm.utils.torch_utils import direct_register_custom_op

LIBRARY = "mla_graph"
OP_NAME = "vllm_mla_forward"
QUALNAME = f"{LIBRARY}::{OP_NAME}"   # vLLM names splitting ops this way

_library = torch.library.Library(LIBRARY, "FRAGMENT")   # must outlive the op


def vllm_mla_forward(hidden_states: torch.Tensor, positions: torch.Tensor, output: torch.Tensor,
                     layer_name: str) -> None:
    """output[:] = the MLA of layer `layer_name` (a LatentCacheLayer in the forward context)."""
    layer = get_forward_context().no_compile_layers[layer_name]
    layer.run(hidden_states, positions, output)


def vllm_mla_forward_fake(hidden_states: torch.Tensor, positions: torch.Tensor, output: torch.Tensor,
                          layer_name: str) -> None:
    return None


def register_op(dispatch_key: str) -> None:
    """Define the op once per process (vLLM loads plugins in every process, maybe more than once)."""
    if hasattr(torch.ops.mla_graph, OP_NAME):
        return
    direct_register_custom_op(OP_NAME, vllm_mla_forward, mutates_args=["output"],
                              fake_impl=vllm_mla_forward_fake, target_lib=_library, dispatch_key=dispatch_key)


def list_as_attention_op() -> None:
    """Beside vLLM's attention ops in CompilationConfig._attention_ops, which vLLM copies into
    splitting_ops when it resolves a config (at start-up, after loading plugins)."""
    from vllm.config import CompilationConfig

    if QUALNAME not in CompilationConfig._attention_ops:
        CompilationConfig._attention_ops.append(QUALNAME)


def split_at_op(compilation_config) -> None:
    """Add the op to a config's splitting_ops that splits without it (a list a platform or the
    user gave). An empty list asks for one whole graph: the op then stays opaque inside it."""
    ops = compilation_config.splitting_ops
    if ops and QUALNAME not in ops:
        ops.append(QUALNAME)

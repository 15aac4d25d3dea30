"""vllm-ascend's options that would bypass or misread the layers mla-graph runs.

Read from vllm-ascend's own AscendConfig (its NPU worker builds it from additional_config before
the model), so the check sees what vllm-ascend itself validated and derived:

- `xlite_graph_config.enabled`: vllm-ascend's xlite model runner executes decode with its own
  kernels over the model's weights, not through the model's layers; mla-graph's MLA would not run
  while the log says it does.
- `enable_kv_nz`: vllm-ascend's MLA kernels and its KV-transfer connectors then read and send the
  MLA cache in the NZ layout (a disaggregated decode node). mla-graph's layers write the cache in
  the ND layout ([num_blocks, block_size, kv_lora_rank + rope]), so a cache received from a
  prefill node would be read wrongly.

Options of vllm-ascend's own MLA kernels (enable_mlapo, ...) have no effect on layers mla-graph
runs; they are left as they are. `weight_nz_mode` casts linear weights to the NZ layout after
loading (2: bf16/fp16 ones too); the layer's linears carry KEEP_ND, the flag vllm-ascend's linear
method reads to leave a weight as it is, since the lowered graphs read those tensors as ND rows and
views (passes derive their own NZ copies where a kernel wants one).
"""
from __future__ import annotations

import sys
from typing import Any

KEEP_ND = "skip_weight_nz_conversion"   # vllm-ascend's AscendUnquantizedLinearMethod reads it

# (where in additional_config, the AscendConfig attribute path, why mla-graph cannot honour it)
CONFLICTS = (
    ("xlite_graph_config.enabled", ("xlite_graph_config", "enabled"),
     "vllm-ascend's xlite runner runs decode with its own kernels, not through the model's MLA layers"),
    ("enable_kv_nz", ("enable_kv_nz",),
     "the MLA cache would be read and transferred in the NZ layout; mla-graph writes it in ND"),
)


def ascend_config() -> Any | None:
    """vllm-ascend's AscendConfig of this process, or None where vllm-ascend has not built one."""
    module = sys.modules.get("vllm_ascend.ascend_config")
    if module is None:
        return None
    try:
        return module.get_ascend_config()
    except RuntimeError:   # "Ascend config is not initialized": no NPU worker in this process
        return None


def refuse_conflicting_options(config: Any | None = None) -> None:
    """Raise ValueError naming every vllm-ascend option set that mla-graph's layers cannot honour."""
    config = ascend_config() if config is None else config
    if config is None:
        return
    found = []
    for key, path, why in CONFLICTS:
        value = config
        for attr in path:
            value = getattr(value, attr, None)
        if value:
            found.append(f"additional_config {key}={value!r}: {why}")
    if found:
        raise ValueError("mla-graph's vLLM plugin (MLA_GRAPH_VLLM=1) cannot run beside vllm-ascend's "
                         + "; ".join(found) + ". Turn the option off or unset MLA_GRAPH_VLLM")

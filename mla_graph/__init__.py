"""mla-graph: Multi-head Latent Attention written once, lowered by passes."""
import importlib
import importlib.util

from .attention import MLAAttention
from .cache import BlockAllocator, CacheFullError, PagedLatentCache
from .capture import ALL_PHASES, PHASES, capture
from .config import MLAConfig, YarnScaling, preset_names
from .npu import npu_backend
from .metadata import MAX_DECODE_TOKENS, MLAMetadata, MetadataError, build_metadata, positions_for

__all__ = [
    "ALL_PHASES", "MAX_DECODE_TOKENS", "BlockAllocator", "CacheFullError", "LoweredMLA", "LoweringError", "MLAAttention", "MLAConfig",
    "MLAMetadata", "MetadataError", "PHASES", "PagedLatentCache", "YarnScaling", "build_metadata",
    "capture", "lower", "npu_backend", "positions_for", "preset_names",
]
_LOWERING = ("LoweredMLA", "LoweringError", "lower")


def __getattr__(name: str):
    # mla_graph.lowering imports the targets, which import every pass; a pass module that imports a
    # mla_graph module (its kernels, its limits) would otherwise import itself half-way when it is
    # the first thing imported. So the lowering entry points load on first use, as do submodules
    # reached as attributes (mla_graph.lowering after `import mla_graph`).
    if name in _LOWERING:
        from . import lowering
        return getattr(lowering, name)
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'mla_graph' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

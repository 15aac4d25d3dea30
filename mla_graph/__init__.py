"""mla-graph: Multi-head Latent Attention written once, lowered by passes."""
from .attention import MLAAttention
from .cache import BlockAllocator, CacheFullError, PagedLatentCache
from .capture import PHASES, capture
from .config import MLAConfig, YarnScaling, preset_names
from .lowering import LoweredMLA, LoweringError, lower
from .npu import npu_backend
from .metadata import MLAMetadata, MetadataError, build_metadata, positions_for

__all__ = [
    "BlockAllocator", "CacheFullError", "LoweredMLA", "LoweringError", "MLAAttention", "MLAConfig",
    "MLAMetadata", "MetadataError", "PHASES", "PagedLatentCache", "YarnScaling", "build_metadata",
    "capture", "lower", "npu_backend", "positions_for", "preset_names",
]

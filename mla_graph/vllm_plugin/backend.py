"""The attention backend of mla-graph's MLA layers: it only builds metadata.

Attention itself runs inside the lowered graph, so this backend has no impl; its builder turns
vLLM's per-step CommonAttentionMetadata into one MLAMetadata shared by every MLA layer.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from vllm.v1.attention.backend import (AttentionBackend, AttentionCGSupport, AttentionMetadataBuilder,
                                       CommonAttentionMetadata)

from ..metadata import MLAMetadata
from .translate import metadata_from_common


class MLAGraphMetadataBuilder(AttentionMetadataBuilder[MLAMetadata]):
    # The lowered graphs read host-side lengths (.tolist()) on some targets: no graph capture.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1)  # MLAMetadata wants decodes (1 new token) first

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> MLAMetadata:
        return metadata_from_common(common_attn_metadata)


class MLAGraphBackend(AttentionBackend):
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return "MLA_GRAPH"

    @staticmethod
    def get_impl_cls():
        raise NotImplementedError("MLA_GRAPH has no attention impl: attention runs inside the "
                                  "lowered mla-graph module of each MLAGraphAttention layer")

    @staticmethod
    def get_builder_cls() -> type[MLAGraphMetadataBuilder]:
        return MLAGraphMetadataBuilder

    @classmethod
    def is_mla(cls) -> bool:
        return True

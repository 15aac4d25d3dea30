"""The attention backend of mla-graph's MLA layers: it only builds metadata.

Attention itself runs inside the lowered graph, so this backend has no impl; its builder turns
vLLM's per-step CommonAttentionMetadata into one MLAMetadata shared by every MLA layer.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from vllm.v1.attention.backend import (AttentionBackend, AttentionCGSupport, AttentionMetadataBuilder,
                                       CommonAttentionMetadata)

from ..metadata import MAX_DECODE_TOKENS, MLAMetadata
from .translate import metadata_from_common


class MLAGraphMetadataBuilder(AttentionMetadataBuilder[MLAMetadata]):
    # The lowered graphs read host-side lengths (.tolist()) on some targets: no graph capture.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        # MLAMetadata wants decodes first: one new token each, or under speculative decoding 1 + the
        # draft tokens (vLLM's spec-as-decode threshold), which the multi_decode graph runs
        self._init_reorder_batch_threshold(1, supports_spec_as_decode=True)
        if self.reorder_batch_threshold > MAX_DECODE_TOKENS:
            raise ValueError(f"speculative decoding with {self.reorder_batch_threshold - 1} draft tokens: mla-graph's "
                             f"decodes take at most {MAX_DECODE_TOKENS} tokens a request (FIA's MLA mode), so "
                             f"num_speculative_tokens must be at most {MAX_DECODE_TOKENS - 1}")

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> MLAMetadata:
        return metadata_from_common(common_attn_metadata, self.reorder_batch_threshold)


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

"""MLAGraphAttention: the out-of-tree replacement of vLLM's MultiHeadLatentAttentionWrapper.

It keeps vLLM's projection and norm modules (their parameters are what vLLM loads), and runs the
whole MLA, projections to o_proj, through a module lowered by mla-graph whose weights are those
same tensors. Its child `mla_attn` (a `LatentCacheLayer`) is what vLLM sees as the attention
layer: it asks for the usual MLA cache ([num_blocks, block_size, kv_lora_rank + rope]) and gets
its metadata from mla-graph's backend.
"""
from __future__ import annotations

import logging

import torch
from torch import nn
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.distributed import (get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size,
                              tensor_model_parallel_all_reduce)
from vllm.forward_context import get_forward_context
from vllm.model_executor.custom_op import PluggableLayer, op_registry_oot
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.model_executor.layers.mla import MLAModules, MultiHeadLatentAttentionWrapper
from vllm.platforms import current_platform
from vllm.v1.kv_cache_interface import MLAAttentionSpec

from ..attention import MLAAttention
from ..lowering import LoweredMLA, lower
from ..metadata import MLAMetadata
from ..rope import cos_sin_table
from .backend import MLAGraphBackend
from .targets import choose_targets
from .translate import config_from_hf, latent_cache_view, share_weights

logger = logging.getLogger("mla_graph.vllm")
REPLACED = MultiHeadLatentAttentionWrapper.__name__  # PluggableLayer looks OOT classes up by class name
_VLLM_MODULES = ("fused_qkv_a_proj", "kv_a_proj_with_mqa", "q_a_layernorm", "q_b_proj", "q_proj",
                 "kv_a_layernorm", "kv_b_proj", "o_proj")


def install() -> None:
    """Register MLAGraphAttention as the OOT class of MultiHeadLatentAttentionWrapper (idempotent)."""
    current = op_registry_oot.get(REPLACED)
    if current is MLAGraphAttention:
        return
    if current is not None:
        raise RuntimeError(f"{REPLACED} is already replaced out of tree by {current.__module__}."
                           f"{current.__qualname__}; unset MLA_GRAPH_VLLM or that plugin's replacement")
    PluggableLayer.register_oot(MLAGraphAttention, name=REPLACED)
    logger.info("mla-graph: replaced vLLM's pluggable layer 'multi_head_latent_attention' (%s.%s) with "
                "%s.%s; DeepSeek MLA layers (projections, norms, rope, cache write, attention, o_proj) "
                "run through the lowered mla-graph module",
                MultiHeadLatentAttentionWrapper.__module__, REPLACED,
                MLAGraphAttention.__module__, MLAGraphAttention.__qualname__)


class LatentCacheLayer(nn.Module, AttentionLayerBase):
    """What vLLM allocates the MLA cache for and builds metadata for; computes nothing."""

    impl = None  # no vLLM attention impl: attention runs in the lowered graph

    def __init__(self, head_size: int, prefix: str, on_weights_loaded) -> None:
        super().__init__()
        self.layer_name = prefix
        self.head_size = head_size
        self.num_kv_heads = 1
        self.kv_cache = torch.tensor([])
        self._on_weights_loaded = on_weights_loaded
        context = get_current_vllm_config().compilation_config.static_forward_context
        if prefix in context:
            raise ValueError(f"Duplicate layer name: {prefix}")
        context[prefix] = self

    def bind_kv_cache(self, kv_cache) -> None:
        self.kv_cache = kv_cache.squeeze(1) if isinstance(kv_cache, torch.Tensor) else kv_cache

    def get_attn_backend(self) -> type[MLAGraphBackend]:
        return MLAGraphBackend

    def get_kv_cache_spec(self, vllm_config: VllmConfig) -> MLAAttentionSpec:
        if vllm_config.cache_config.cache_dtype != "auto":
            raise NotImplementedError(f"kv_cache_dtype={vllm_config.cache_config.cache_dtype!r}: the "
                                      f"mla-graph vLLM plugin supports 'auto' (the model dtype) only")
        return MLAAttentionSpec(block_size=vllm_config.cache_config.block_size, num_kv_heads=1,
                                head_size=self.head_size, dtype=vllm_config.model_config.dtype,
                                cache_dtype_str="auto")

    def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
        # vLLM calls this after every quant method has finalised its weights: lower now.
        self._on_weights_loaded()


class MLAGraphAttention(MultiHeadLatentAttentionWrapper):
    """forward(positions, hidden_states) -> [T, hidden_size], like the layer it replaces."""

    def __init__(self, hidden_size: int, num_heads: int, scale: float, qk_nope_head_dim: int,
                 qk_rope_head_dim: int, v_head_dim: int, q_lora_rank: int | None, kv_lora_rank: int,
                 mla_modules: MLAModules, cache_config=None, quant_config=None, prefix: str = "",
                 **unsupported) -> None:
        # Not MultiHeadLatentAttentionWrapper.__init__: it builds vLLM's MLAAttention (an impl, a
        # prefill backend, W_UK/W_UV copies of kv_b_proj) that the lowered graph replaces.
        nn.Module.__init__(self)
        if mla_modules.is_sparse or mla_modules.indexer is not None:
            raise NotImplementedError(f"{prefix}: sparse MLA (DeepSeek-V3.2 indexer) is not supported by mla-graph")
        if unsupported.get("fuse_qkv_rmsnorm") or unsupported.get("non_causal_multi_token_decode"):
            raise NotImplementedError(f"{prefix}: options {sorted(k for k, v in unsupported.items() if v)} "
                                      f"are not supported by mla-graph")
        if mla_modules.g_proj is not None:
            raise NotImplementedError(f"{prefix}: gated MLA output (g_proj) is not supported by mla-graph")
        vllm_config = get_current_vllm_config()
        self.config = config_from_hf(vllm_config.model_config.hf_config)
        c = self.config
        self.tp_size, self.tp_rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        got = (hidden_size, num_heads * self.tp_size, q_lora_rank, kv_lora_rank, qk_nope_head_dim,
               qk_rope_head_dim, v_head_dim)
        want = (c.hidden_size, c.num_heads, c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim,
                c.qk_rope_head_dim, c.v_head_dim)
        if got != want:
            raise ValueError(f"{prefix}: vLLM builds MLA with (hidden, heads, q_lora, kv_lora, nope, rope, v) "
                             f"= {got} but the model config gives {want}")
        if abs(scale - c.softmax_scale) > 1e-6 * c.softmax_scale:
            raise ValueError(f"{prefix}: vLLM's softmax scale {scale} differs from mla-graph's {c.softmax_scale}")
        self.hidden_size, self.num_heads, self.q_lora_rank = hidden_size, num_heads, q_lora_rank
        self.kv_lora_rank, self.qk_rope_head_dim = kv_lora_rank, qk_rope_head_dim
        self.prefix = prefix
        # vLLM's modules, under the names vLLM's weight loading expects
        for name in _VLLM_MODULES:
            module = getattr(mla_modules, name)
            setattr(self, name, module)
            if hasattr(module, "quant_method"):
                # vLLM's CPU linear method would otherwise repack the weight and drop the tensor the
                # lowered graph reads (vLLM sets the same flag on kv_b_proj for its own MLA).
                module.skip_weight_relayout = True
        self.reduce_results = getattr(self.o_proj, "reduce_results", True)
        self.targets = choose_targets(vllm_config.additional_config, current_platform.device_type)
        self.block_size = vllm_config.cache_config.block_size
        self.mla_attn = LatentCacheLayer(kv_lora_rank + qk_rope_head_dim, f"{prefix}.attn", self.lower_now)
        # Held outside the module tree: they alias vLLM's parameters, which vLLM already owns.
        self._lowered: dict[str, LoweredMLA] = {}

    def lower_now(self) -> None:
        """Lower this layer for its targets over vLLM's (final, loaded) weights."""
        source = self._graph_source()
        by_target: dict[str, list[str]] = {}
        for phase, target in self.targets.items():
            by_target.setdefault(target, []).append(phase)
        lowered = {}
        for target, phases in by_target.items():
            module = lower(source, target, phases, block_size=self.block_size)
            lowered.update({phase: module for phase in phases})
        self._lowered = lowered
        logger.info("mla-graph: %s lowered (%s) over vLLM's weights",
                    self.prefix, ", ".join(f"{p}: {t}" for p, t in self.targets.items()))

    def _graph_source(self) -> MLAAttention:
        """An MLAAttention whose parameters are vLLM's tensors (built on meta, then re-pointed)."""
        weight = self.kv_b_proj.weight
        cos_sin = cos_sin_table(self.config)  # computed (and cached) on the host before the meta scope
        with torch.device("meta"):
            source = MLAAttention(self.config, dtype=weight.dtype, tp_size=self.tp_size, tp_rank=self.tp_rank)
        source.cos_sin = cos_sin.to(weight.device)
        share_weights(source, {n: getattr(self, n) for n in _VLLM_MODULES}, self.q_lora_rank)
        return source

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                llama_4_scaling: torch.Tensor | None = None) -> torch.Tensor:
        if llama_4_scaling is not None:
            raise NotImplementedError(f"{self.prefix}: llama_4_scaling is not supported by mla-graph")
        metadata = self._metadata()
        if metadata is None:
            # vLLM's profiling and dummy runs carry no attention metadata and no cache
            return hidden_states.new_zeros(hidden_states.shape[0], self.hidden_size)
        if not self._lowered:
            self.lower_now()  # weights were set without vLLM's loader (tests, custom loading)
        cache = latent_cache_view(self.mla_attn.kv_cache, self.kv_lora_rank, self.qk_rope_head_dim)
        n = metadata.num_tokens
        out = self._lowered[metadata.phase](hidden_states[:n], positions[:n], cache, metadata)
        if n < hidden_states.shape[0]:  # padded batch: padding rows give zeros
            out = torch.cat([out, out.new_zeros(hidden_states.shape[0] - n, out.shape[1])])
        if self.tp_size > 1 and self.reduce_results:
            out = tensor_model_parallel_all_reduce(out)
        return out

    def _metadata(self) -> MLAMetadata | None:
        raw = get_forward_context().attn_metadata
        if isinstance(raw, list):  # speculative decoding: [0] is the base model's
            raw = raw[0]
        if isinstance(raw, dict):
            raw = raw.get(self.mla_attn.layer_name)
        if raw is not None and not isinstance(raw, MLAMetadata):
            raise TypeError(f"{self.mla_attn.layer_name}: expected MLAMetadata from the MLA_GRAPH backend, "
                            f"got {type(raw).__name__}")
        return raw

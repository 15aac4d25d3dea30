"""MLAGraphAttention: the out-of-tree replacement of vLLM's MultiHeadLatentAttentionWrapper.

It keeps vLLM's projection and norm modules (their parameters are what vLLM loads), and runs the
whole MLA, projections to o_proj, through a module lowered by mla-graph whose weights are those
same tensors. Its forward is one opaque op (op.py), so vLLM's torch.compile never traces into it.
Its child `mla_attn` (a `LatentCacheLayer`) is what vLLM sees as the attention layer: it asks for
the usual MLA cache ([num_blocks, block_size, kv_lora_rank + rope]), gets its metadata from
mla-graph's backend, and is what the op finds by name in the forward context.

Weights: the lowered graphs alias vLLM's tensors; only the weights passes derived (absorbed
W_UK/W_UV, the prolog's) are copies. Every vLLM weight loader of the layer is wrapped to mark them
stale (vLLM's loaders write through `.data`, which autograd's version counter does not see), and
they are recut before the next step; vLLM's post-load hook (load and reload) recuts them too.
"""
from __future__ import annotations

import functools
import logging
from typing import Callable

import torch
from torch import nn
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.distributed import (get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size,
                              tensor_model_parallel_all_reduce)
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.model_executor.layers.mla import MLAModules, MultiHeadLatentAttentionWrapper
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.platforms import current_platform
from vllm.v1.kv_cache_interface import MLAAttentionSpec

from ..attention import MLAAttention
from ..lowering import LoweredMLA, lower
from ..metadata import MAX_DECODE_TOKENS, MLAMetadata
from ..rope import cos_sin_table
from ..targets import TARGETS
from ..runtime.binding import StepMemo
from .ascend import KEEP_ND, refuse_conflicting_options
from .backend import MLAGraphBackend
from .op import split_at_op
from .targets import choose_targets_and_why
from .translate import config_from_hf, latent_cache_view, share_weights
from .versions import vllm_support

logger = logging.getLogger("mla_graph.vllm")
_VLLM_MODULES = ("fused_qkv_a_proj", "kv_a_proj_with_mqa", "q_a_layernorm", "q_b_proj", "q_proj",
                 "kv_a_layernorm", "kv_b_proj", "o_proj")


class LatentCacheLayer(nn.Module, AttentionLayerBase):
    """What vLLM allocates the MLA cache for and builds metadata for; computes nothing."""

    impl = None  # no vLLM attention impl: attention runs in the lowered graph

    def __init__(self, head_size: int, prefix: str, run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None],
                 on_weights_loaded: Callable[[], None]) -> None:
        super().__init__()
        self.layer_name = prefix
        self.head_size = head_size
        self.num_kv_heads = 1
        self.kv_cache = torch.tensor([])
        self.run = run   # (hidden_states, positions, output): what the op calls
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
        # vLLM calls this after every quant method has finalised its weights, on load and reload
        self._on_weights_loaded()


class MLAGraphAttention(MultiHeadLatentAttentionWrapper):
    """forward(positions, hidden_states) -> [T, hidden_size], like the layer it replaces."""

    # the per-step inputs (rope rows, lengths) of the step running: a vLLM worker runs one model, whose
    # layers compute each once per step (a value is reused only while what it was derived from is the
    # same tensors, unwritten)
    _step_memo = StepMemo()

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
        refuse_conflicting_options()   # vllm-ascend's, where it runs
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
        skip_relayout = vllm_support().skip_relayout_attr
        # vLLM's modules, under the names vLLM's weight loading expects
        for name in _VLLM_MODULES:
            module = getattr(mla_modules, name)
            setattr(self, name, module)
            if hasattr(module, "quant_method"):
                # vLLM's CPU linear method would otherwise repack the weight and drop the tensor the
                # lowered graph reads (vLLM sets the same flag on kv_b_proj for its own MLA), and
                # vllm-ascend's would cast it to the NZ layout (weight_nz_mode=2) where the lowered
                # graph reads ND rows and views.
                setattr(module, skip_relayout, True)
                setattr(module, KEEP_ND, True)
        self.reduce_results = getattr(self.o_proj, "reduce_results", True)
        self.targets, self.targets_chosen_by = choose_targets_and_why(vllm_config.additional_config,
                                                                      current_platform.device_type)
        speculative = vllm_config.speculative_config
        self.target_options: dict[str, dict] = {}
        if speculative is not None and speculative.num_speculative_tokens:
            # verification batches: decodes of 1 + the draft tokens (the backend's reorder threshold)
            self.targets["multi_decode"] = self.targets["decode"]
            self.targets["multi_mixed"] = self.targets["mixed"]
            if "graph_decode_tokens" in TARGETS[self.targets["decode"]].options:   # torchair: one graph size
                self.target_options[self.targets["decode"]] = {
                    "graph_decode_tokens": [min(1 + speculative.num_speculative_tokens, MAX_DECODE_TOKENS)]}
        self.block_size = vllm_config.cache_config.block_size
        split_at_op(vllm_config.compilation_config)
        self.mla_attn = LatentCacheLayer(kv_lora_rank + qk_rope_head_dim, f"{prefix}.attn", self._run,
                                         self.weights_loaded)
        # Held outside the module tree: they alias vLLM's parameters, which vLLM already owns.
        self._lowered: dict[str, LoweredMLA] = {}
        self._lowered_over: dict[str, int] = {}   # data_ptr of each vLLM weight the graphs alias
        self._weights_written = False
        for param in self._vllm_weights().values():
            param.weight_loader = _marks_weights_written(getattr(param, "weight_loader", default_weight_loader),
                                                         self.mark_weights_written)

    def _vllm_weights(self) -> dict[str, nn.Parameter]:
        return {f"{name}.{p}": param for name in _VLLM_MODULES if getattr(self, name) is not None
                for p, param in getattr(self, name).named_parameters(recurse=False)}

    def mark_weights_written(self) -> None:
        """Weights were written (through vLLM's loaders, or by hand): the derived ones are recut
        before the next step. Costs nothing until then."""
        self._weights_written = True

    def weights_loaded(self) -> None:
        """vLLM's post-load hook, after a load or a reload: lower, or follow the new weights."""
        if self._lowered:
            self.follow_weights()
        else:
            self.lower_now()

    def follow_weights(self) -> None:
        """Bring the lowered graphs up to vLLM's current weights: recut the derived weights in
        place, or lower again where vLLM swapped a weight's storage (the graphs alias the old)."""
        if {n: p.data_ptr() for n, p in self._vllm_weights().items()} != self._lowered_over:
            logger.info("mla-graph: %s: vLLM replaced weight tensors; lowering again", self.prefix)
            self.lower_now()
            return
        for module in {id(m): m for m in self._lowered.values()}.values():
            module.refresh_derived(force=True)
        self._weights_written = False

    def lower_now(self) -> None:
        """Lower this layer for its targets over vLLM's (final, loaded) weights."""
        source = self._graph_source()
        by_target: dict[str, list[str]] = {}
        for phase, target in self.targets.items():
            by_target.setdefault(target, []).append(phase)
        lowered = {}
        for target, phases in by_target.items():
            module = lower(source, target, phases, block_size=self.block_size,
                           target_options=self.target_options.get(target))
            lowered.update({phase: module for phase in phases})
        self._lowered = lowered
        self._lowered_over = {n: p.data_ptr() for n, p in self._vllm_weights().items()}
        self._weights_written = False
        logger.info("mla-graph: %s lowered (%s) over vLLM's weights%s; targets from %s",
                    self.prefix, ", ".join(f"{p}: {t}" for p, t in self.targets.items()),
                    f" (tensor parallel rank {self.tp_rank} of {self.tp_size}: {self.num_heads} heads)"
                    if self.tp_size > 1 else "", self.targets_chosen_by)

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
        """What vLLM's torch.compile traces: one opaque op, which runs `_run` on every step."""
        if llama_4_scaling is not None:
            raise NotImplementedError(f"{self.prefix}: llama_4_scaling is not supported by mla-graph")
        output = torch.empty((hidden_states.shape[0], self.hidden_size), dtype=hidden_states.dtype,
                             device=hidden_states.device)
        torch.ops.mla_graph.vllm_mla_forward(hidden_states, positions, output, self.mla_attn.layer_name)
        if self.tp_size > 1 and self.reduce_results:
            output = tensor_model_parallel_all_reduce(output)
        return output

    def _run(self, hidden_states: torch.Tensor, positions: torch.Tensor, output: torch.Tensor) -> None:
        """The op's body, eager, with this step's metadata: output[:] = this rank's MLA."""
        metadata = self._metadata()
        if metadata is None:
            output.zero_()   # vLLM's profiling and dummy runs carry no attention metadata and no cache
            return
        if not self._lowered:
            self.lower_now()  # weights were set without vLLM's loader (tests, custom loading)
        elif self._weights_written:
            self.follow_weights()
        cache = latent_cache_view(self.mla_attn.kv_cache, self.kv_lora_rank, self.qk_rope_head_dim)
        n = metadata.num_tokens
        output[:n] = self._lowered[metadata.phase](hidden_states[:n], positions[:n], cache, metadata,
                                                   step_memo=self._step_memo)
        output[n:] = 0  # padded batch: padding rows give zeros

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


def _marks_weights_written(loader: Callable, mark: Callable[[], None]) -> Callable:
    """`loader`, then `mark()`. functools.wraps keeps its name and (through __wrapped__) its
    signature, which vLLM's layerwise reload binds arguments by."""
    @functools.wraps(loader)
    def weight_loader(*args, **kwargs):
        result = loader(*args, **kwargs)
        mark()
        return result
    return weight_loader

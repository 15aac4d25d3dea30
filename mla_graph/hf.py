"""Hugging Face DeepSeek-V2/V3 models (and Kimi-K2, same architecture) on mla-graph's lowered MLA.

    from mla_graph.hf import convert
    model = convert(AutoModelForCausalLM.from_pretrained(...), target="reference")
    model.generate(input_ids, attention_mask=mask, max_new_tokens=64)   # unchanged

`convert` replaces every decoder layer's `self_attn` (transformers' DeepseekV3Attention or
DeepseekV2Attention) with an `MLAForHF` whose weights are that module's own Parameters (shared,
never copied: a later `load_state_dict` or optimizer step reaches it), lowered once per layer
shape for the target. `generate` then gets a `PagedMLACache` (a transformers `Cache`) holding one
paged latent cache per layer: each batch row is one request whose context is its non-padding
tokens, in blocks handed out as it grows; the step's metadata (slots, block table, lengths,
positions) is built once per forward and shared by every layer.

Positions are each row's count of earlier non-padding tokens (what `generate` gives its rows,
left padding included). Beam search (which reorders cache rows) is not supported.
"""
from __future__ import annotations

import dataclasses
import types
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from .attention import MLAAttention, check_call
from .cache import PagedLatentCache
from .capture import PHASES
from .config import MLAConfig
from .layer_op import call_layer
from .lowering import LoweredMLA
from .metadata import MLAMetadata, build_metadata, positions_for
from .model_lowering import lower_layers

# transformers' attention classes convert() knows; their forward is
# (hidden_states [B, S, H], position_embeddings, attention_mask, cache=None, **kwargs) -> (out, weights)
HF_MLA_CLASSES = ("DeepseekV3Attention", "DeepseekV2Attention")
_SHARED = ("q_proj", "q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm",
           "kv_b_proj", "o_proj")


class ConversionError(ValueError):
    pass


def is_hf_mla(module: nn.Module) -> bool:
    return type(module).__name__ in HF_MLA_CLASSES


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers causal LM or base model (`model.model.layers`)."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConversionError(f"{type(model).__name__} has no decoder layers at .model.layers or .layers; "
                              f"convert() takes a transformers DeepSeek-V2/V3 model (DeepseekV3ForCausalLM, ...)")
    return layers


def mla_config(hf_config: Any, attention: nn.Module) -> MLAConfig:
    """MLAConfig of one HF attention module (its norms' eps is the module's own: HF builds them
    with the default 1e-6, whatever config.rms_norm_eps says)."""
    fields = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    if fields.get("attention_bias"):
        raise ConversionError("attention_bias=True: mla-graph's MLA has no projection biases (DeepSeek has none)")
    if "rope_interleave" in fields and not fields["rope_interleave"]:
        raise ConversionError("rope_interleave=False: this model rotates rope channels in halves; mla-graph "
                              "computes DeepSeek's interleaved rope (rope_interleave=True, transformers' default "
                              "for DeepSeek-V3)")
    config = MLAConfig.from_hf(fields)
    eps = getattr(attention.kv_a_layernorm, "variance_epsilon", getattr(attention.kv_a_layernorm, "eps", None))
    if eps is not None and eps != config.rms_norm_eps:
        config = config.replace(rms_norm_eps=float(eps))
    return config


class MLAForHF(nn.Module):
    """Stands in for one transformers DeepSeek attention module: same parameters (the very same
    Parameter objects, under the same names), same forward signature, lowered MLA inside."""

    def __init__(self, attention: nn.Module, layer_idx: int, lowered: LoweredMLA, source: MLAAttention) -> None:
        super().__init__()
        for name in _SHARED:
            module = getattr(attention, name, None)
            if module is not None:
                setattr(self, name, module)    # HF's modules: state_dict keys stay as they were
        self.layer_idx = layer_idx
        self.config = source.config
        self.hf_class = type(attention).__name__
        # outside the module tree: they hold the same Parameters as the modules above
        self.__dict__["lowered"] = lowered
        self.__dict__["source"] = source

    def forward(self, hidden_states: torch.Tensor, position_embeddings: Any = None,
                attention_mask: torch.Tensor | None = None, cache: Any = None, **kwargs: Any):
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        if cache is None:
            raise TypeError(f"layer {self.layer_idx}: the converted model was called without a cache (use_cache="
                            f"False, or a forward call with none); its attention reads every request's context "
                            f"from a PagedMLACache: use generate() with use_cache=True (its default), or pass "
                            f"cache=PagedMLACache.for_model(model, batch_size, max_tokens) and use_cache=True")
        if not isinstance(cache, PagedMLACache):
            raise TypeError(f"layer {self.layer_idx}: mla-graph's MLA needs a PagedMLACache, got "
                            f"{type(cache).__name__}; call the converted model through generate() without a "
                            f"cache of your own (it makes one), or pass "
                            f"cache=PagedMLACache.for_model(model, batch_size, max_tokens) and use_cache=True")
        weights = self.kv_b_proj.weight.dtype
        if weights != self.lowered.dtype:
            raise ConversionError(f"layer {self.layer_idx}: the model's weights are {weights} but convert() lowered "
                                  f"it for {self.lowered.dtype} (the dtype changed after convert(), e.g. "
                                  f"model.to({weights})); a lowering is made for one dtype: change the dtype "
                                  f"first, then convert (convert(model.to({weights}), target))")
        step = cache.step
        if step is None:
            raise RuntimeError("PagedMLACache has no step in progress: the converted model's forward hook "
                               "did not run (call the model returned by mla_graph.hf.convert)")
        B, S, H = hidden_states.shape
        if (B, S) != (step.batch_size, step.query_length):
            raise ValueError(f"layer {self.layer_idx}: hidden_states is [{B}, {S}, ...] but this step was "
                             f"set up for [{step.batch_size}, {step.query_length}]")
        out = hidden_states.new_zeros(B * S, H)
        if step.token_index.numel():
            flat = hidden_states.reshape(B * S, H).index_select(0, step.token_index)
            kv_cache = cache.latent_caches[self.layer_idx]
            if torch.compiler.is_compiling():
                # torch.compile: one mla::layer node, which the "mla_graph" backend lowers (see
                # compile_backend); other backends run it as the plain definition
                check_call(self.config, self.source.dtype, flat, step.positions, kv_cache, step.metadata)
                attended = call_layer(self.source, flat, step.positions, kv_cache, step.metadata)
            else:
                attended = self.lowered(flat, step.positions, kv_cache, step.metadata)
            out.index_copy_(0, step.token_index, attended)
        return out.view(B, S, H), None


@dataclasses.dataclass
class Step:
    """One forward's batch as mla-graph sees it, shared by every layer."""
    batch_size: int
    query_length: int
    token_index: torch.Tensor     # flat [B * S] indices of the real (non-padding) new tokens, in batch order
    positions: torch.Tensor
    metadata: MLAMetadata | None
    new_per_row: list[int]


class PagedMLALayer(CacheLayerMixin):
    """The per-layer face transformers expects of a cache layer (lengths for its mask code); the
    latents live in the owner's paged caches."""

    is_compileable = False
    is_croppable = True        # PagedMLACache.crop gives rejected draft tokens back (assisted generation)
    is_sliding = False
    supports_early_init = False

    def __init__(self, owner: "PagedMLACache") -> None:
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise NotImplementedError("PagedMLACache layers are written by mla-graph's lowered MLA")

    def update(self, *args: Any, **kwargs: Any):
        return self.owner.update()

    def get_seq_length(self) -> int:
        return self.owner.columns

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.columns + query_length, 0

    def get_max_length(self) -> int:
        return self.owner.max_tokens

    def reset(self) -> None:
        pass


class PagedMLACache(Cache):
    """A transformers Cache over mla-graph's paged latent caches (one PagedLatentCache per layer,
    one block allocator for all: every layer's request b has the same block table row).

    `columns` is the sequence length transformers sees (padding included); each row's own context
    is its non-padding tokens only."""

    def __init__(self, configs: list[MLAConfig], *, batch_size: int, max_tokens: int, block_size: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        for name, value in (("batch_size", batch_size), ("max_tokens", max_tokens), ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PagedMLACache: {name} must be a positive int, got {value!r}")
        blocks = batch_size * -(-max_tokens // block_size) + 1    # + the padding block, never handed out
        self.latent_caches = [PagedLatentCache.allocate(c, blocks, block_size, dtype=dtype, device=device)
                              for c in configs]
        self.allocator = self.latent_caches[0].allocator
        self.block_size = block_size
        self.max_tokens = max_tokens
        self.rows: list[list[int]] = [[] for _ in range(batch_size)]   # block table row per batch row
        self.context: list[int] = [0] * batch_size                       # non-padding tokens cached per row
        self.columns = 0
        self.real = torch.zeros(batch_size, 0, dtype=torch.bool)       # which columns of each row are tokens
        self.step: Step | None = None
        super().__init__(layers=[PagedMLALayer(self) for _ in configs])

    @classmethod
    def for_model(cls, model: nn.Module, batch_size: int, max_tokens: int) -> "PagedMLACache":
        """A cache for a converted model: `max_tokens` per row (prompt + new tokens)."""
        layers = [layer.self_attn for layer in decoder_layers(model)]
        if not all(isinstance(a, MLAForHF) for a in layers):
            raise ConversionError("the model's attention layers are not converted; call mla_graph.hf.convert first")
        first = layers[0]
        return cls([a.config for a in layers], batch_size=batch_size, max_tokens=max_tokens,
                   block_size=first.lowered.block_size, dtype=first.source.dtype,
                   device=first.kv_b_proj.weight.device)

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    def begin_step(self, query_length: int, attention_mask: torch.Tensor | None) -> Step:
        """Set up one forward of [batch, query_length] new columns (`attention_mask`: transformers'
        2-D mask over all columns so far, 1 = real token)."""
        B = self.batch_size
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != B:
                raise ValueError(f"attention_mask must be 2-D [batch={B}, columns], got {list(attention_mask.shape)}")
            if attention_mask.shape[1] != self.columns + query_length:
                raise ValueError(f"attention_mask covers {attention_mask.shape[1]} columns but the cache holds "
                                 f"{self.columns} and this step adds {query_length}")
            real = attention_mask[:, -query_length:].bool().cpu()
        else:
            real = torch.ones(B, query_length, dtype=torch.bool)
        new = real.sum(dim=1).tolist()
        rows = sorted((b for b in range(B) if new[b] > 0), key=lambda b: (new[b] != 1, b))   # decodes first
        requests = [(new[b], self.context[b]) for b in rows]
        for b, (n, cached) in zip(rows, requests):
            if cached + n > self.max_tokens:
                raise ValueError(f"batch row {b} reaches {cached + n} tokens but this PagedMLACache holds "
                                 f"{self.max_tokens} per row")
            self.allocator.grow(self.rows[b], cached + n, self.block_size)
        device = self.latent_caches[0].latent.device
        index = [b * query_length + s for b in rows for s in range(query_length) if real[b, s]]
        metadata = (build_metadata(requests, [self.rows[b] for b in rows], self.block_size, device=device)
                    if rows else None)
        self.step = Step(B, query_length, torch.tensor(index, dtype=torch.long, device=device),
                         positions_for(requests, device=device), metadata, new)
        self._step_real = real
        return self.step

    def end_step(self) -> None:
        step = self.step
        if step is None:
            return
        for b, n in enumerate(step.new_per_row):
            self.context[b] += n
        self.columns += step.query_length
        self.real = torch.cat([self.real, self._step_real], dim=1)
        self.step = None

    # transformers' Cache API: what a paged cache cannot do says so
    def update(self, *args: Any, **kwargs: Any):
        raise NotImplementedError("PagedMLACache is written by mla-graph's lowered MLA, not through update(); "
                                  "the model's attention layers must be converted (mla_graph.hf.convert)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("beam search reorders cache rows; PagedMLACache does not support it "
                                  "(greedy and sampling do not need it)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("PagedMLACache cannot drop batch rows")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("PagedMLACache cannot repeat batch rows; create it for the expanded batch")

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last columns, as assisted generation does with the draft tokens the model rejected:
        `tokens_to_remove` <= 0 removes that many (transformers 5), a positive value keeps that many
        (the max_length of transformers 4). Each row gives back the slots of its tokens among them
        (the next step writes its tokens there) and every block it no longer needs."""
        if self.step is not None:
            raise RuntimeError("PagedMLACache.crop during a forward (between begin_step and end_step)")
        if isinstance(tokens_to_remove, bool) or not isinstance(tokens_to_remove, int):
            raise ValueError(f"crop takes an int (tokens to remove as a negative number, or the length to "
                             f"keep), got {tokens_to_remove!r}")
        keep = self.columns + tokens_to_remove if tokens_to_remove <= 0 else tokens_to_remove
        if not 0 <= keep <= self.columns:
            raise ValueError(f"crop({tokens_to_remove}): the cache holds {self.columns} columns; it can remove "
                             f"at most that many (crop(-{self.columns})) or keep at most that many")
        dropped = self.real[:, keep:].sum(dim=1).tolist()
        for b, n in enumerate(dropped):
            self.context[b] -= n
            needed = -(-self.context[b] // self.block_size)
            if len(self.rows[b]) > needed:
                self.allocator.free(self.rows[b][needed:])
                del self.rows[b][needed:]
        self.real = self.real[:, :keep]
        self.columns = keep

    def reset(self) -> None:
        for c in self.latent_caches:
            c.latent.zero_()
            c.rope.zero_()
        for row in self.rows:
            self.allocator.free(row)
            row.clear()
        self.context = [0] * self.batch_size
        self.columns = 0
        self.real = self.real[:, :0]
        self.step = None


@torch._dynamo.disable   # host-side bookkeeping: under torch.compile it runs eagerly, between graphs
def _begin(module: nn.Module, args: tuple, kwargs: dict) -> None:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if not isinstance(cache, PagedMLACache):
        return   # the attention layers say what is wrong
    ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    shape = (ids if ids is not None else embeds).shape
    if shape[0] != cache.batch_size:
        raise ValueError(f"batch of {shape[0]} rows but the PagedMLACache was made for {cache.batch_size}")
    cache.begin_step(shape[1], kwargs.get("attention_mask"))


@torch._dynamo.disable
def _end(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if isinstance(cache, PagedMLACache):
        cache.end_step()


def convert(model: nn.Module, target: str = "reference", *, block_size: int = 16,
            phases: tuple[str, ...] = PHASES, checked: bool | None = None,
            target_options: dict | None = None) -> nn.Module:
    """Make every attention layer of a transformers DeepSeek-V2/V3 model run mla-graph's MLA lowered
    for `target`, in place; returns the model. Weights are shared with the model (not copied)."""
    layers = decoder_layers(model)
    attentions = [layer.self_attn for layer in layers]
    already = [i for i, a in enumerate(attentions) if isinstance(a, MLAForHF)]
    if already:
        raise ConversionError(f"layers {already} are converted already")
    foreign = [f"{i}: {type(a).__name__}" for i, a in enumerate(attentions) if not is_hf_mla(a)]
    if foreign:
        raise ConversionError(f"convert() knows {', '.join(HF_MLA_CLASSES)}; found {', '.join(foreign)}")
    hf_config = getattr(model, "config", None)
    if hf_config is None:
        raise ConversionError(f"{type(model).__name__} has no .config")
    sources = []
    for attention in attentions:
        config = mla_config(hf_config, attention)
        weight = attention.kv_b_proj.weight
        cos_sin = _rope_table(config, weight.device)   # (cached) on the host, before the meta scope
        with torch.device("meta"):
            source = MLAAttention(config, dtype=weight.dtype)
        source.cos_sin = cos_sin
        for name in _SHARED:
            if getattr(attention, name, None) is not None:
                _share(source, attention, name)
        source.checked = checked
        sources.append(source)
    lowered = lower_layers(sources, target, phases, block_size=block_size, target_options=target_options)
    for i, (layer, attention, source, module) in enumerate(zip(layers, attentions, sources, lowered)):
        module.checked = checked
        source.__dict__["prelowered"] = module   # what the mla_graph backend runs for this layer and target
        layer.self_attn = MLAForHF(attention, i, module, source)
    base = getattr(model, "model", model)
    base.register_forward_pre_hook(_begin, with_kwargs=True)
    base.register_forward_hook(_end, with_kwargs=True)
    if hasattr(model, "_prepare_cache_for_generation"):
        original = model._prepare_cache_for_generation

        def prepare_cache(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length):
            if generation_config.use_cache is False:
                raise ValueError("generate(use_cache=False): a converted model's attention reads every request's "
                                 "context from its paged cache (PagedMLACache), so it needs use_cache=True, "
                                 "generate's default; leave use_cache out")
            if (generation_config.num_beams or 1) > 1:
                raise NotImplementedError(f"num_beams={generation_config.num_beams}: beam search reorders cache "
                                          f"rows, which mla-graph's paged cache does not support; greedy and "
                                          f"sampling work")
            if model_kwargs.get("cache", model_kwargs.get("past_key_values")) is None \
                    and generation_config.use_cache is not False:
                model_kwargs["cache"] = PagedMLACache.for_model(self, batch_size, max_cache_length)
            return original(generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)
        model._prepare_cache_for_generation = types.MethodType(prepare_cache, model)
    return model


def _rope_table(config: MLAConfig, device: torch.device) -> torch.Tensor:
    from .rope import cos_sin_table
    return cos_sin_table(config).to(device)


def _share(source: MLAAttention, attention: nn.Module, name: str) -> None:
    """source.<name>'s weight becomes the HF module's Parameter (same object)."""
    hf_module, ours = getattr(attention, name), getattr(source, name)
    hf_weight = hf_module.weight
    if tuple(hf_weight.shape) != tuple(ours.weight.shape):
        raise ConversionError(f"{name}.weight is {list(hf_weight.shape)}; mla-graph expects {list(ours.weight.shape)}")
    ours.weight = hf_weight

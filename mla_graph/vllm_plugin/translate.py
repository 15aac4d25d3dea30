"""vLLM -> mla-graph translations: configuration, weights (shared, never copied), KV cache
(views, never copied) and attention metadata."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..attention import MLAAttention
from ..cache import PagedLatentCache
from ..config import MLAConfig
from ..metadata import MLAMetadata


def config_from_hf(hf_config: Any) -> MLAConfig:
    """MLAConfig from the Hugging Face config vLLM holds. vLLM renames DeepSeek's yarn rope type
    to "deepseek_yarn" in place while building the layer; it is the same scaling."""
    fields: dict[str, Any] = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    for key in ("rope_parameters", "rope_scaling"):
        rope = fields.get(key)
        if isinstance(rope, Mapping):
            rope = dict(rope)
            for type_key in ("rope_type", "type"):
                if rope.get(type_key) == "deepseek_yarn":
                    rope[type_key] = "yarn"
            fields[key] = rope
    return MLAConfig.from_hf(fields)


def _weight(module: nn.Module, name: str) -> torch.Tensor:
    method = getattr(module, "quant_method", None)
    if method is not None and type(method).__name__ != "UnquantizedLinearMethod":
        raise NotImplementedError(f"{name} is quantized ({type(method).__name__}); the mla-graph vLLM "
                                  f"plugin supports unquantized weights only")
    return module.weight


def share_weights(layer: MLAAttention, modules: Mapping[str, nn.Module | None], q_lora_rank: int | None) -> None:
    """Point `layer`'s parameters at vLLM's loaded tensors: same storage, no copy. vLLM fuses
    q_a_proj and kv_a_proj_with_mqa into fused_qkv_a_proj; the two are row slices of it."""
    def put(owner: nn.Module, tensor: torch.Tensor, name: str) -> None:
        current = owner.weight
        if tuple(tensor.shape) != tuple(current.shape):
            raise ValueError(f"vLLM's {name} is {list(tensor.shape)} but mla-graph expects "
                             f"{list(current.shape)} for this configuration")
        owner.weight = nn.Parameter(tensor.detach(), requires_grad=False)

    if q_lora_rank is not None:
        fused = _weight(modules["fused_qkv_a_proj"], "fused_qkv_a_proj")
        put(layer.q_a_proj, fused[:q_lora_rank], "fused_qkv_a_proj[:q_lora_rank]")
        put(layer.kv_a_proj_with_mqa, fused[q_lora_rank:], "fused_qkv_a_proj[q_lora_rank:]")
        put(layer.q_a_layernorm, modules["q_a_layernorm"].weight, "q_a_layernorm")
        put(layer.q_b_proj, _weight(modules["q_b_proj"], "q_b_proj"), "q_b_proj")
    else:
        put(layer.q_proj, _weight(modules["q_proj"], "q_proj"), "q_proj")
        put(layer.kv_a_proj_with_mqa, _weight(modules["kv_a_proj_with_mqa"], "kv_a_proj_with_mqa"),
            "kv_a_proj_with_mqa")
    put(layer.kv_a_layernorm, modules["kv_a_layernorm"].weight, "kv_a_layernorm")
    put(layer.kv_b_proj, _weight(modules["kv_b_proj"], "kv_b_proj"), "kv_b_proj")
    put(layer.o_proj, _weight(modules["o_proj"], "o_proj"), "o_proj")


def latent_cache_view(kv_cache: torch.Tensor | tuple[torch.Tensor, torch.Tensor], kv_lora_rank: int,
                      qk_rope_head_dim: int) -> PagedLatentCache:
    """vLLM's MLA cache as a PagedLatentCache, as views of the same storage.

    - vLLM: one tensor [num_blocks, block_size, L + R] (kv_c = [..., :L], k_pe = [..., L:]),
      or with a head axis of 1 ([num_blocks, 1, block_size, L + R] before bind_kv_cache squeezes
      it, or [num_blocks, block_size, 1, L + R]): two row-strided views of it, which every target
      reads and writes in place;
    - vllm-ascend: a tuple (nope [num_blocks, block_size, 1, L], rope [num_blocks, block_size, 1, R]).
    """
    L, R = kv_lora_rank, qk_rope_head_dim
    if isinstance(kv_cache, (tuple, list)):
        if len(kv_cache) != 2:
            raise ValueError(f"a split MLA cache must be (nope, rope), got {len(kv_cache)} tensors")
        return PagedLatentCache(kv_cache[0], kv_cache[1])
    if kv_cache.dim() == 4 and 1 in kv_cache.shape[1:3]:
        kv_cache = kv_cache.squeeze(1 if kv_cache.shape[1] == 1 else 2)
    if kv_cache.dim() != 3 or kv_cache.shape[-1] != L + R:
        raise ValueError(f"vLLM's MLA cache must be [num_blocks, block_size, {L + R}] "
                         f"(kv_lora_rank {L} + qk_rope_head_dim {R}), got {list(kv_cache.shape)}")
    return PagedLatentCache(kv_cache[..., :L].unsqueeze(2), kv_cache[..., L:].unsqueeze(2))


def metadata_from_common(common: Any, decode_threshold: int = 1) -> MLAMetadata:
    """MLAMetadata from vLLM's CommonAttentionMetadata (batch already ordered decodes first).

    `decode_threshold`: the builder's reorder_batch_threshold, 1 + the speculative tokens under
    speculative decoding: the leading requests of at most that many new tokens are decodes (vLLM's
    split_decodes_and_prefills). Slices of vLLM's tensors, no copies except dtype casts the
    primitives need: slot_mapping is int64 (vLLM's already is), the rest stay as vLLM made them (int32)."""
    B, T = common.num_reqs, common.num_actual_tokens
    qsl_cpu = common.query_start_loc_cpu[: B + 1]
    query_lens = (qsl_cpu[1:] - qsl_cpu[:-1]).tolist()
    decodes = 0
    while decodes < B and query_lens[decodes] <= decode_threshold:
        decodes += 1
    if any(q <= decode_threshold for q in query_lens[decodes:]):
        raise ValueError(f"vLLM's batch is not ordered decodes first (query lengths {query_lens}, decodes of at "
                         f"most {decode_threshold} new tokens); the builder's reorder_batch_threshold must be "
                         f"{decode_threshold}")
    return MLAMetadata(
        slot_mapping=common.slot_mapping[:T].long(),
        block_table=common.block_table_tensor[:B],
        seq_lens=common.seq_lens[:B],
        query_start_loc=common.query_start_loc[: B + 1],
        num_decodes=decodes,
        num_decode_tokens=int(sum(query_lens[:decodes])),
        num_prefills=B - decodes,
    )

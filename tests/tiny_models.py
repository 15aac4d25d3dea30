"""Tiny random-weight DeepSeek-V3 checkpoints on disk, for a real vLLM engine and Hugging Face.

`write_tiny_deepseek(directory, variant)` writes what `vllm.LLM(model=directory)` and
`transformers.AutoModelForCausalLM.from_pretrained(directory)` load: config.json,
model.safetensors (Hugging Face's DeepseekV3ForCausalLM, seeded random weights) and a byte-level
BPE tokenizer trained offline on a few sentences (tokenizer.json, tokenizer_config.json). Nothing
is downloaded.

The shapes keep what vLLM's CPU MLA backends require, kv_lora_rank + qk_rope_head_dim = 512 + 64
= 576, and shrink everything else. Every branch a real model takes is exercised: yarn rope with
mscale != mscale_all_dim, q_lora and no q_lora, v_head_dim equal to and different from
qk_nope_head_dim, dense and MoE MLPs (sigmoid scoring with the noaux_tc correction bias, grouped
top-k, a shared expert).
"""
from __future__ import annotations

import json
import math
import pathlib
from dataclasses import dataclass

import torch

BOS, EOS = "<|begin|>", "<|end|>"  # ids 0 and 1: the tokenizer's first special tokens
TOKENIZER_TEXT = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.",
    "Multi-head latent attention compresses keys and values into one small latent vector per token.",
    "A paged cache stores sixteen tokens per block; a long request spans several blocks.",
    "Greedy decoding picks the most likely token at every step, so two correct engines agree.",
    "Rotary position embeddings rotate pairs of channels by an angle that grows with the position.",
    "Mixture of experts routes every token to a few experts chosen by a small gating network.",
    "0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ? ' \" # $ % & @ ^ _ ` | ~",
]


@dataclass(frozen=True)
class TinyDeepseek:
    """One tiny model: the fields that differ between variants."""
    moe: bool
    q_lora_rank: int | None
    v_head_dim: int = 32


VARIANTS = {
    # DeepSeek-V3-like attention (q_lora), dense MLPs in every layer
    "dense": TinyDeepseek(moe=False, q_lora_rank=64),
    # DeepSeek-V2-Lite-like attention (no q_lora, v_head_dim != qk_nope_head_dim), MoE from the
    # second layer on
    "moe": TinyDeepseek(moe=True, q_lora_rank=None, v_head_dim=48),
}
NUM_LAYERS = 2
VOCAB = 1024


def hf_config(variant: TinyDeepseek) -> dict:
    """config.json's fields (Hugging Face names) for the variant."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "dtype": "float32",
        "vocab_size": VOCAB, "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 64,
        "num_hidden_layers": NUM_LAYERS, "num_attention_heads": 4, "num_key_value_heads": 4,
        "q_lora_rank": variant.q_lora_rank, "kv_lora_rank": 512, "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 32, "v_head_dim": variant.v_head_dim,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
        # yarn with mscale != mscale_all_dim: the softmax scale and the cos/sin cache both change
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                            "original_max_position_embeddings": 128, "beta_fast": 32, "beta_slow": 1,
                            "mscale": 1.0, "mscale_all_dim": 0.8},
        "rope_interleave": True,  # Hugging Face: DeepSeek's interleaved rope, as vLLM computes it
        # MoE (vLLM reads topk_method/scoring_func; without them it looks for no correction bias)
        "first_k_dense_replace": 1 if variant.moe else NUM_LAYERS,
        "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1,
        "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
        "topk_method": "noaux_tc", "scoring_func": "sigmoid",
        "num_nextn_predict_layers": 0, "tie_word_embeddings": False,
        "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": None,
    }


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Seeded random weights with O(1) activations: linears ~ N(0, 1/fan_in), embeddings N(0, 1),
    norm gammas 1 + N(0, 0.3) (ones would hide a missing gamma), the router's correction bias
    N(0, 0.1) (zeros would hide a missing bias)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):  # what is saved: no rope buffers
            noise = torch.randn(tensor.shape, generator=gen, dtype=torch.float32)
            if name.endswith("e_score_correction_bias"):
                value = 0.1 * noise
            elif tensor.dim() == 1:
                value = 1.0 + 0.3 * noise
            elif "embed_tokens" in name:
                value = noise
            else:  # [out, in] or experts' [E, out, in]
                value = noise / math.sqrt(tensor.shape[-1])
            tensor.copy_(value.to(tensor.dtype))


def write_tokenizer(directory: pathlib.Path) -> None:
    """A byte-level BPE trained on TOKENIZER_TEXT: any text encodes, BOS/EOS are ids 0 and 1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TOKENIZER_TEXT, trainer)
    assert tokenizer.token_to_id(BOS) == 0 and tokenizer.token_to_id(EOS) == 1
    assert tokenizer.get_vocab_size() <= VOCAB, tokenizer.get_vocab_size()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
        "add_bos_token": False, "add_eos_token": False, "model_max_length": 512,
        "clean_up_tokenization_spaces": False}, indent=1))


def write_tiny_deepseek(directory: str | pathlib.Path, variant: str, seed: int = 0) -> pathlib.Path:
    """Write the variant ("dense" or "moe") to directory; returns it."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fields = hf_config(VARIANTS[variant])
    config = DeepseekV3Config(**{k: v for k, v in fields.items() if k not in ("architectures", "model_type")})
    torch.manual_seed(seed)  # the constructor's own init, overwritten below
    model = DeepseekV3ForCausalLM(config).to(torch.float32).eval()
    randomize_(model, seed)
    model.save_pretrained(directory)  # per-expert tensors, as DeepSeek's checkpoints name them
    # The fields Hugging Face's config class does not keep (vLLM reads them) go in afterwards.
    saved = json.loads((directory / "config.json").read_text())
    saved.update({k: fields[k] for k in ("topk_method", "scoring_func", "num_nextn_predict_layers")})
    (directory / "config.json").write_text(json.dumps(saved, indent=1, sort_keys=True))
    write_tokenizer(directory)
    return directory


def write_with_attention_of(directory: str | pathlib.Path, base: pathlib.Path, donor: pathlib.Path) -> pathlib.Path:
    """A checkpoint that is `base` except for its attention weights (every `self_attn.` tensor),
    which come from `donor` (same variant, another seed): a weight update of the MLA layers."""
    import shutil

    from safetensors.torch import load_file, save_file

    directory = pathlib.Path(directory)
    shutil.copytree(base, directory)
    weights, donor_weights = load_file(base / "model.safetensors"), load_file(donor / "model.safetensors")
    swapped = {k: donor_weights[k] if ".self_attn." in k else v for k, v in weights.items()}
    assert sum(".self_attn." in k for k in swapped) >= 2 * NUM_LAYERS
    save_file(swapped, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def write_with_mtp_layer(directory: str | pathlib.Path, base: pathlib.Path, seed: int = 7) -> pathlib.Path:
    """`base` plus one DeepSeek multi-token-prediction layer (num_nextn_predict_layers 1), as DeepSeek-V3's
    checkpoints store it: layer NUM_LAYERS holds a whole decoder layer (here a copy of the last one's
    weights, its MLA included; dense or MoE as the last is) and enorm, hnorm, eh_proj ([hidden, 2 hidden]) and shared_head (a norm
    and an LM head: here the model's own). Hugging Face's DeepseekV3 ignores the layer; vLLM's
    deepseek_mtp drafts with it."""
    import shutil

    from safetensors.torch import load_file, save_file

    directory = pathlib.Path(directory)
    shutil.copytree(base, directory)
    weights = load_file(base / "model.safetensors")
    last, mtp = f"model.layers.{NUM_LAYERS - 1}.", f"model.layers.{NUM_LAYERS}."
    weights.update({mtp + k[len(last):]: v.clone() for k, v in weights.items() if k.startswith(last)})
    hidden = weights["model.norm.weight"].shape[0]
    gen = torch.Generator().manual_seed(seed)
    weights[mtp + "enorm.weight"] = 1.0 + 0.3 * torch.randn(hidden, generator=gen)
    weights[mtp + "hnorm.weight"] = 1.0 + 0.3 * torch.randn(hidden, generator=gen)
    weights[mtp + "eh_proj.weight"] = torch.randn(hidden, 2 * hidden, generator=gen) / math.sqrt(2 * hidden)
    weights[mtp + "shared_head.norm.weight"] = weights["model.norm.weight"].clone()
    weights[mtp + "shared_head.head.weight"] = weights["lm_head.weight"].clone()
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    if config["first_k_dense_replace"] == NUM_LAYERS:   # a dense model's MTP layer is dense too (layer NUM_LAYERS)
        config["first_k_dense_replace"] = NUM_LAYERS + 1
    (directory / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True))
    return directory

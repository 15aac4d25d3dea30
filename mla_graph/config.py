"""MLAConfig: the dimensions of one Multi-head Latent Attention layer.

Presets carry the real dimensions of released models; `from_hf` reads a Hugging Face
`config.json` (either the older `rope_scaling` or the newer `rope_parameters` form).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class YarnScaling:
    """DeepSeek's yarn rope scaling (`rope_scaling` with type "yarn")."""

    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass(frozen=True)
class MLAConfig:
    hidden_size: int
    num_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    rope_scaling: YarnScaling | None = None
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived quantities ---------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim**-0.5, times mscale(factor, mscale_all_dim)**2 under yarn (DeepSeek)."""
        scale = self.qk_head_dim**-0.5
        yarn = self.rope_scaling
        if yarn is not None and yarn.mscale_all_dim:
            m = yarn_get_mscale(yarn.factor, yarn.mscale_all_dim)
            scale *= m * m
        return scale

    def heads_per_rank(self, tp_size: int) -> int:
        if not isinstance(tp_size, int) or tp_size < 1:
            raise ValueError(f"tp_size must be a positive int, got {tp_size!r}")
        if self.num_heads % tp_size:
            raise ValueError(
                f"num_heads={self.num_heads} is not divisible by tp_size={tp_size}; "
                f"allowed tp_size values divide {self.num_heads}"
            )
        return self.num_heads // tp_size

    def replace(self, **changes: Any) -> "MLAConfig":
        """A copy with some fields changed (validated like any new config)."""
        return dataclasses.replace(self, **changes)

    # ---- validation -------------------------------------------------------------------
    def validate(self) -> None:
        for name in ("hidden_size", "num_heads", "kv_lora_rank", "qk_nope_head_dim",
                     "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"):
            _check_positive_int(name, getattr(self, name))
        if self.q_lora_rank is not None:
            _check_positive_int("q_lora_rank", self.q_lora_rank, "a positive int or None")
        if self.qk_rope_head_dim % 2:
            raise ValueError(
                f"qk_rope_head_dim must be even (rope rotates pairs), got {self.qk_rope_head_dim}"
            )
        if not (isinstance(self.rms_norm_eps, (int, float)) and 0 < self.rms_norm_eps < 1):
            raise ValueError(f"rms_norm_eps must be a float in (0, 1), got {self.rms_norm_eps!r}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 1):
            raise ValueError(f"rope_theta must be a number > 1, got {self.rope_theta!r}")
        yarn = self.rope_scaling
        if yarn is None:
            return
        if not isinstance(yarn, YarnScaling):
            raise ValueError(f"rope_scaling must be a YarnScaling or None, got {yarn!r}")
        if not (isinstance(yarn.factor, (int, float)) and yarn.factor >= 1):
            raise ValueError(f"rope_scaling.factor must be a number >= 1, got {yarn.factor!r}")
        _check_positive_int("rope_scaling.original_max_position_embeddings",
                            yarn.original_max_position_embeddings)
        for fname in ("beta_fast", "beta_slow"):
            value = getattr(yarn, fname)
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"rope_scaling.{fname} must be a number > 0, got {value!r}")
        if yarn.beta_fast < yarn.beta_slow:
            raise ValueError(
                f"rope_scaling.beta_fast ({yarn.beta_fast}) must be >= beta_slow ({yarn.beta_slow})"
            )
        for fname in ("mscale", "mscale_all_dim"):
            value = getattr(yarn, fname)
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"rope_scaling.{fname} must be a number >= 0, got {value!r}")

    # ---- constructors -------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "MLAConfig":
        key = name.lower().replace("_", "-")
        key = _PRESET_ALIASES.get(key, key)
        if key not in _PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(preset_names())}")
        return cls(**_PRESETS[key], name=key)

    @classmethod
    def from_hf(cls, config: Mapping[str, Any] | str | os.PathLike) -> "MLAConfig":
        """Read a Hugging Face DeepSeek-V2/V3 (or Kimi-K2) config dict or config.json path."""
        if isinstance(config, (str, os.PathLike)):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            try:
                with open(path, encoding="utf-8") as fh:
                    config = json.load(fh)
            except FileNotFoundError:
                raise ValueError(f"Hugging Face config not found: {path!r}") from None
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path!r} is not valid JSON: {exc}") from None
        if not isinstance(config, Mapping):
            raise ValueError(f"from_hf expects a dict or a path to config.json, got {type(config).__name__}")
        required = ("hidden_size", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
                    "qk_rope_head_dim", "v_head_dim")
        missing = [k for k in required if k not in config]
        if missing:
            raise ValueError(f"Hugging Face config lacks MLA field(s) {missing}; is this a DeepSeek-V2/V3 config?")
        rope_key = "rope_parameters" if config.get("rope_parameters") else "rope_scaling"
        rope = config.get(rope_key) or {}
        if not isinstance(rope, Mapping):
            raise ValueError(f"Hugging Face config field {rope_key} must be a dict (e.g. {{\"type\": \"yarn\", "
                             f"\"factor\": 40, ...}}) or null, got {type(rope).__name__} {rope!r}")
        rope_theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        yarn = None
        if rope_type == "yarn":
            if rope.get("factor") is None:
                raise ValueError(f"Hugging Face config {rope_key} has type 'yarn' but no 'factor' (the context "
                                 f"extension factor, 40 for DeepSeek-V3); got {dict(rope)!r}")

            def number(key: str, default: float, kind: type = float) -> Any:
                value = rope.get(key)
                if value is None:
                    return default if key != "mscale" else 0.0
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"Hugging Face config {rope_key}.{key} must be a number, got {value!r}")
                return kind(value)
            yarn = YarnScaling(
                factor=number("factor", 1.0),
                original_max_position_embeddings=number("original_max_position_embeddings", 4096, int),
                beta_fast=number("beta_fast", 32.0) or 32.0,
                beta_slow=number("beta_slow", 1.0) or 1.0,
                mscale=number("mscale", 1.0) if "mscale" in rope else 1.0,   # null reads as 0
                mscale_all_dim=number("mscale_all_dim", 0.0),
            )
        elif rope_type not in ("default", None):
            raise ValueError(f"rope type {rope_type!r} is not supported; supported: 'default', 'yarn'")
        return cls(
            hidden_size=config["hidden_size"],
            num_heads=config["num_attention_heads"],
            q_lora_rank=config.get("q_lora_rank"),
            kv_lora_rank=config["kv_lora_rank"],
            qk_nope_head_dim=config["qk_nope_head_dim"],
            qk_rope_head_dim=config["qk_rope_head_dim"],
            v_head_dim=config["v_head_dim"],
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            max_position_embeddings=config.get("max_position_embeddings", 4096),
            rope_scaling=yarn,
            name=str(config.get("_name_or_path") or config.get("model_type") or "hf"),
        )

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face DeepseekV3Config fields for this layer (used by tests and tools)."""
        out: dict[str, Any] = {
            "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_heads,
            "q_lora_rank": self.q_lora_rank,
            "kv_lora_rank": self.kv_lora_rank,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
        }
        yarn = self.rope_scaling
        if yarn is not None:
            out["rope_scaling"] = {"type": "yarn", **dataclasses.asdict(yarn)}
        return out


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def preset_names(aliases: bool = False) -> list[str]:
    """The presets' names; with `aliases`, the other names they answer to too (deepseek-r1, ...)."""
    return sorted(_PRESETS) + (sorted(_PRESET_ALIASES) if aliases else [])


def _check_positive_int(name: str, value: Any, allowed: str = "a positive int") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


_DEEPSEEK_YARN_V2 = YarnScaling(factor=40, original_max_position_embeddings=4096, beta_fast=32,
                                beta_slow=1, mscale=0.707, mscale_all_dim=0.707)
_DEEPSEEK_YARN_V3 = YarnScaling(factor=40, original_max_position_embeddings=4096, beta_fast=32,
                                beta_slow=1, mscale=1.0, mscale_all_dim=1.0)
_KIMI_YARN = YarnScaling(factor=32, original_max_position_embeddings=4096, beta_fast=1,
                         beta_slow=1, mscale=1.0, mscale_all_dim=1.0)

# Dimensions as published in each model's config.json.
_PRESETS: dict[str, dict[str, Any]] = {
    "deepseek-v2-lite": dict(hidden_size=2048, num_heads=16, q_lora_rank=None, kv_lora_rank=512,
                             qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                             max_position_embeddings=163840, rope_scaling=_DEEPSEEK_YARN_V2),
    "deepseek-v2": dict(hidden_size=5120, num_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                        max_position_embeddings=163840, rope_scaling=_DEEPSEEK_YARN_V2),
    "deepseek-v3": dict(hidden_size=7168, num_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                        max_position_embeddings=163840, rope_scaling=_DEEPSEEK_YARN_V3),
    "kimi-k2": dict(hidden_size=7168, num_heads=64, q_lora_rank=1536, kv_lora_rank=512,
                    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                    rope_theta=50000.0, max_position_embeddings=131072, rope_scaling=_KIMI_YARN),
}
_PRESET_ALIASES = {"deepseek-r1": "deepseek-v3", "deepseek-v3.1": "deepseek-v3"}

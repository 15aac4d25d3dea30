"""Arguments shared by several subcommands."""
from __future__ import annotations

import argparse

import torch

from ..capture import PHASES
from ..config import MLAConfig, preset_names

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--preset | --hf-config, --dtype, --tp-size, --block-size."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=preset_names() + ["deepseek-r1"],
                     help="a built-in model configuration")
    src.add_argument("--hf-config", metavar="PATH", help="a Hugging Face config.json (or its folder)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weight dtype (default bf16)")
    p.add_argument("--tp-size", type=int, default=1, help="tensor-parallel size: the layer holds num_heads/tp_size heads")
    p.add_argument("--block-size", type=int, default=128, help="paged cache block size (default 128)")


def phases(values: list[str] | None) -> list[str]:
    if not values or "all" in values:
        return list(PHASES)
    return values


def config_from(args: argparse.Namespace) -> MLAConfig:
    return MLAConfig.preset(args.preset) if args.preset else MLAConfig.from_hf(args.hf_config)

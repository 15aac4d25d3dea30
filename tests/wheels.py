"""The real torch-npu wheel of the running torch's stack (2.13.0 beside torch 2.13, 2.10.0.post4
beside torch 2.10; mla_graph.stacks), for tests that compare our vendored data with it.

Downloaded once with `pip download --no-deps` into $MLA_GRAPH_CACHE or ~/.cache/mla-graph/wheels
(never the repo) and read as a zip file, never imported: installed without CANN it breaks torch.
Without network the tests fail, unless MLA_GRAPH_OFFLINE=1 says to skip them.
"""
from __future__ import annotations

import functools
import os
import pathlib

import pytest

from mla_graph.ascend_toolchain.wheel import ToolchainUnavailable, fetch_wheel
from mla_graph.stacks import torch_npu_release


@functools.cache
def _download() -> tuple[pathlib.Path | None, str]:
    """(wheel path, "") or (None, why not); cached so a missing network costs one attempt."""
    try:
        return fetch_wheel(), ""
    except ToolchainUnavailable as error:
        return None, str(error)


def torch_npu_wheel() -> pathlib.Path:
    """The wheel's path; fails the calling test without it (skips only under MLA_GRAPH_OFFLINE=1)."""
    return fetched(*_download(), f"the real torch-npu {torch_npu_release()} wheel")


def fetched(path: pathlib.Path | None, reason: str, what: str) -> pathlib.Path:
    """`path`, fetched from the network for a test; without it (`reason` says why) the calling test
    fails, or skips under MLA_GRAPH_OFFLINE=1, naming `what` it checks against."""
    if path is None:
        if os.environ.get("MLA_GRAPH_OFFLINE") == "1":
            pytest.skip(f"MLA_GRAPH_OFFLINE=1 and {reason}")
        pytest.fail(f"{reason}\nSet MLA_GRAPH_OFFLINE=1 to skip the checks against {what} on a host without "
                    f"network.")
    return path

"""The real torch-npu 2.13.0 wheel, for tests that compare our vendored data with it.

Downloaded once with `pip download --no-deps` into $MLA_GRAPH_CACHE or ~/.cache/mla-graph/wheels
(never the repo) and read as a zip file, never imported: installed without CANN it breaks torch.
Without network the tests fail, unless MLA_GRAPH_OFFLINE=1 says to skip them.
"""
from __future__ import annotations

import functools
import os
import pathlib
import subprocess
import sys

import pytest

TORCH_NPU = "torch-npu==2.13.0"


def _cache_dir() -> pathlib.Path:
    root = os.environ.get("MLA_GRAPH_CACHE")
    return pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "mla-graph" / "wheels"


@functools.cache
def _download() -> tuple[pathlib.Path | None, str]:
    """(wheel path, "") or (None, why not); cached so a missing network costs one attempt."""
    cache = _cache_dir()
    wheels = sorted(cache.glob("torch_npu-2.13.0-*.whl"))
    if not wheels:
        cache.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", TORCH_NPU, "-d", str(cache)],
                              capture_output=True, text=True)
        wheels = sorted(cache.glob("torch_npu-2.13.0-*.whl"))
        if done.returncode != 0 or not wheels:
            return None, f"could not download {TORCH_NPU} into {cache}: {done.stderr.strip()[-500:]}"
    return wheels[0], ""


def torch_npu_wheel() -> pathlib.Path:
    """The wheel's path; fails the calling test without it (skips only under MLA_GRAPH_OFFLINE=1)."""
    wheel, reason = _download()
    if wheel is None:
        if os.environ.get("MLA_GRAPH_OFFLINE") == "1":
            pytest.skip(f"MLA_GRAPH_OFFLINE=1 and {reason}")
        pytest.fail(f"{reason}\nSet MLA_GRAPH_OFFLINE=1 to skip the checks against the real wheel on a "
                    f"host without network.")
    return wheel

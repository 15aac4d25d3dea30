"""vllm-ascend's own Python code, for tests that check the plugin against it on a CPU host.

vllm-ascend 0.30.0rc2 (the release beside vLLM 0.30.0 and torch 2.10.0) is published as a source
distribution only, and `pip download` cannot fetch it: preparing its metadata builds the package,
which needs CANN. So the sdist is fetched from the package index's JSON API (PEP 691), checked
against the sha256 pinned here, and unpacked once beside the torch-npu wheels ($MLA_GRAPH_CACHE
or ~/.cache/mla-graph/wheels; never the repo). Only its Python package and its egg-info are
kept; the egg-info's entry points make vLLM find vllm-ascend's platform and general plugins as if
it were installed, once the unpacked folder is on sys.path. `_build_info.py` is what vllm-ascend's build writes (the device
type it was built for); the A3 (Atlas A3, DeepSeek serving hardware) is written.

Without network the tests fail, unless MLA_GRAPH_OFFLINE=1 says to skip them.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import shutil
import tarfile
import tempfile
import urllib.request

from wheels import fetched

from mla_graph.ascend_toolchain.wheel import cache_dir

RELEASE = "0.30.0rc2"
SDIST = f"vllm_ascend-{RELEASE}.tar.gz"
SHA256 = "05cb51448c0cd174ea338b16ebbfc8e215f44b373ea2a0d65f1314523a01152f"   # PyPI's, 20,901,945 bytes
INDEX = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")


def _sdist_url() -> str:
    request = urllib.request.Request(f"{INDEX}/vllm-ascend/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    for entry in files:
        if entry["filename"] == SDIST:
            return entry["url"]
    raise FileNotFoundError(f"{INDEX}/vllm-ascend/ lists no {SDIST}")


@functools.cache
def _unpack() -> tuple[pathlib.Path | None, str]:
    """(folder holding vllm_ascend/ and its egg-info, "") or (None, why not)."""
    root = cache_dir() / f"vllm_ascend-{RELEASE}-unpacked"
    if (root / ".complete").exists():
        return root, ""
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
            archive = pathlib.Path(tmp) / SDIST
            with urllib.request.urlopen(_sdist_url(), timeout=300) as response, open(archive, "wb") as out:
                shutil.copyfileobj(response, out)
            digest = hashlib.sha256(archive.read_bytes()).hexdigest()
            if digest != SHA256:
                return None, f"{SDIST} has sha256 {digest}, expected {SHA256}"
            staged = pathlib.Path(tmp) / "staged"
            top = f"vllm_ascend-{RELEASE}/"
            with tarfile.open(archive) as sdist:
                members = [m for m in sdist.getmembers()
                           if m.name.startswith((top + "vllm_ascend/", top + "vllm_ascend.egg-info/"))]
                sdist.extractall(staged, members=members, filter="data")
            package = staged / top / "vllm_ascend"
            (package / "_build_info.py").write_text("# written by mla-graph's tests, as vllm-ascend's build does\n"
                                                    "__device_type__ = 'A3'\n")
            shutil.rmtree(root, ignore_errors=True)
            (staged / top).rename(root)
            (root / ".complete").touch()
    except OSError as error:
        return None, f"could not fetch vllm-ascend {RELEASE}'s sdist from {INDEX}: {error}"
    return root, ""


def vllm_ascend_source() -> pathlib.Path:
    """The unpacked folder; fails the calling test without it (skips only under MLA_GRAPH_OFFLINE=1)."""
    return fetched(*_unpack(), "vllm-ascend's code")

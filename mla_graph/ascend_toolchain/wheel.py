"""Where the torch-npu wheel lives, and the few parts of it the toolchain reads.

The release is the running torch's (mla_graph.stacks: 2.10.0.post4 beside torch 2.10, 2.13.0
beside torch 2.13). The wheel is downloaded (`pip download --no-deps`), never installed: installed
on a host without CANN it breaks `import torch`. Only its pure-Python parts and one header are
unpacked, once, into a folder of that release beside the wheel.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

from ..stacks import torch_npu_release

# GE's TensorType::NumberType() & co. (2.13.0 also has it at include/graph/; 2.10.0.post4 only here)
TYPES_H = "torch_npu/include/third_party/acl/inc/graph/types.h"
# What the toolchain reads, as prefixes of paths inside the wheel.
PARTS = (
    "torch_npu/dynamo/",                                    # torchair: FX -> GE converters, GE IR registry
    "torch_npu/op_plugin/meta/",                            # torch-npu's Python meta functions
    "torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml",   # the npu:: op schemas
    "torch_npu/_op_plugin_docs.py",                         # the op docs (argument limits, dtypes)
    TYPES_H,
)
# torchair's four CANN-linked extension modules stay in the zip: stand-ins replace them, and
# without the files no import can reach for libge_runner and friends.
_LEFT_OUT_SUFFIX = ".so"


class ToolchainUnavailable(RuntimeError):
    """The real toolchain cannot be loaded here; the message says why."""


def requirement(release: str | None = None) -> str:
    return f"torch-npu=={release or torch_npu_release()}"


def cache_dir() -> pathlib.Path:
    """$MLA_GRAPH_CACHE, else ~/.cache/mla-graph/wheels (the same place tests/wheels.py uses)."""
    root = os.environ.get("MLA_GRAPH_CACHE")
    return pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "mla-graph" / "wheels"


def find_wheel(cache: pathlib.Path | None = None, release: str | None = None) -> pathlib.Path | None:
    """The cached wheel of `release` (default: the running torch's torch-npu), or None; never downloads."""
    wheels = sorted((cache or cache_dir()).glob(f"torch_npu-{release or torch_npu_release()}-*.whl"))
    return wheels[0] if wheels else None


def fetch_wheel(cache: pathlib.Path | None = None, release: str | None = None) -> pathlib.Path:
    """The cached wheel, downloading it with pip first if needed (for tests and setup scripts)."""
    cache = cache or cache_dir()
    release = release or torch_npu_release()
    wheel = find_wheel(cache, release)
    if wheel is not None:
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", requirement(release), "-d",
                           str(cache)], capture_output=True, text=True)
    wheel = find_wheel(cache, release)
    if done.returncode != 0 or wheel is None:
        raise ToolchainUnavailable(f"could not download {requirement(release)} into {cache} (pip exit "
                                   f"{done.returncode}): {done.stderr.strip()[-500:]}")
    return wheel


def wheel_release(wheel: pathlib.Path) -> str:
    """The torch-npu release of a wheel file, from its name (torch_npu-2.10.0.post4-cp311-...)."""
    parts = pathlib.Path(wheel).name.split("-")
    if len(parts) < 3 or parts[0] != "torch_npu":
        raise ToolchainUnavailable(f"{pathlib.Path(wheel).name} is not named like a torch-npu wheel "
                                   f"(torch_npu-RELEASE-...whl)")
    return parts[1]


def required_torch(wheel: pathlib.Path) -> str | None:
    """The torch release the wheel was built for (its METADATA's `Requires-Dist: torch ==X`), or None."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            meta = next((n for n in archive.namelist() if n.endswith(".dist-info/METADATA")), None)
            text = archive.read(meta).decode() if meta else ""
    except (OSError, zipfile.BadZipFile):
        return None
    match = re.search(r"^Requires-Dist:\s*torch\s*\(?\s*==\s*([0-9][^\s,;)*]*)", text, re.MULTILINE)
    return match.group(1).rstrip(".") if match else None


def extract(wheel: pathlib.Path) -> pathlib.Path:
    """Unpack PARTS of `wheel` into <wheel's folder>/torch_npu-<release>-extracted once and return
    that folder.

    Unpacks into a temporary folder and renames it into place, so a crash or a concurrent run
    never leaves a half-written tree behind (the loser of a race removes its own copy). A folder
    lacking one of PARTS (written by an older version of this list) is replaced."""
    name = f"torch_npu-{wheel_release(wheel)}-extracted"
    target = wheel.parent / name
    if all((target / part).exists() for part in PARTS):
        return target
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as error:
        raise ToolchainUnavailable(f"{wheel} is not a readable wheel: {error}") from error
    with archive:
        names = [n for n in archive.namelist()
                 if n.startswith(PARTS) and not n.endswith("/") and not n.endswith(_LEFT_OUT_SUFFIX)]
        missing = [p for p in PARTS if not any(n.startswith(p) for n in names)]
        if missing:
            raise ToolchainUnavailable(f"{wheel} lacks {missing}; expected the layout of torch-npu 2.10.0.post4 "
                                       f"or 2.13.0")
        scratch = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}-", dir=wheel.parent))
        archive.extractall(scratch, names)
    if target.exists():
        stale = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}-stale-", dir=wheel.parent))
        with contextlib.suppress(FileNotFoundError):   # a concurrent run may have moved it already
            os.rename(target, stale / "old")
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(scratch, target)
    except OSError:
        shutil.rmtree(scratch, ignore_errors=True)
        if not target.is_dir():
            raise
    return target

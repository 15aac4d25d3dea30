"""The vendored npu:: schemas equal torch-npu 2.13.0's YAML, and the registered ops
carry them. The wheel is downloaded once (never imported) into $MLA_GRAPH_CACHE or
~/.cache/mla-graph/wheels. Without network the test fails, unless
MLA_GRAPH_OFFLINE=1 says to skip it."""
import functools
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest
import torch
import yaml

from mla_graph.npu import EMULATED_SCHEMAS, ensure_npu_ops

TORCH_NPU = "torch-npu==2.13.0"
YAML_SUFFIX = "csrc/aten/npu_native_functions_by_codegen.yaml"


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


@functools.cache
def _wheel_schemas(wheel: pathlib.Path) -> dict[str, str]:
    with zipfile.ZipFile(wheel) as archive:
        text = archive.read(next(n for n in archive.namelist() if n.endswith(YAML_SUFFIX))).decode()
    found: dict[str, str] = {}

    def visit(node):
        if isinstance(node, dict):
            if isinstance(node.get("func"), str):
                found.setdefault(node["func"].split("(", 1)[0], node["func"])
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for item in node:
                visit(item)
    visit(yaml.safe_load(text))
    return found


def wheel_yaml() -> dict[str, str]:
    """Schemas of the wheel's YAML by op name; fails (or, offline by request, skips) without the wheel."""
    wheel, reason = _download()
    if wheel is None:
        if os.environ.get("MLA_GRAPH_OFFLINE") == "1":
            pytest.skip(f"MLA_GRAPH_OFFLINE=1 and {reason}")
        pytest.fail(f"{reason}\nSet MLA_GRAPH_OFFLINE=1 to skip schema conformance on a host without network.")
    return _wheel_schemas(wheel)


NPU_OPS = sorted(q for q in EMULATED_SCHEMAS if q.startswith("npu::"))


@pytest.mark.parametrize("qualname", NPU_OPS)
def test_vendored_schema_equals_wheel_yaml(qualname):
    schemas = wheel_yaml()
    name = qualname.split("::")[1]
    assert name in schemas, f"{name} is not in torch-npu 2.13.0's YAML"
    assert EMULATED_SCHEMAS[qualname] == schemas[name]


def _alias(info):
    return None if info is None else (sorted(info.before_set), sorted(info.after_set), info.is_write)


def _signature(schema: torch.FunctionSchema):
    args = [(a.name, str(a.type), a.kwarg_only, _alias(a.alias_info), a.default_value) for a in schema.arguments]
    returns = [(str(r.type), _alias(r.alias_info)) for r in schema.returns]
    return args, returns


@pytest.mark.parametrize("qualname", sorted(EMULATED_SCHEMAS))
def test_registered_op_carries_the_schema(qualname):
    if ensure_npu_ops() != "emulated":
        pytest.skip("torch_npu is installed: the real ops are registered, not the emulation")
    namespace, name = qualname.split("::")
    registered = getattr(getattr(torch.ops, namespace), name).default._schema
    expected = torch._C.parse_schema(f"{namespace}::{EMULATED_SCHEMAS[qualname]}")
    assert registered.name == f"{namespace}::{name}"
    assert _signature(registered) == _signature(expected)

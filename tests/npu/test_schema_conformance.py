"""The vendored npu:: schemas equal torch-npu 2.13.0's YAML, and the registered ops
carry them. The wheel is downloaded once (never imported) into $MLA_GRAPH_CACHE or
~/.cache/mla-graph/wheels. Without network the test fails, unless
MLA_GRAPH_OFFLINE=1 says to skip it."""
import functools
import pathlib
import zipfile

import pytest
import torch
import yaml

from wheels import torch_npu_wheel

from mla_graph.npu import EMULATED_SCHEMAS, ensure_npu_ops

YAML_SUFFIX = "csrc/aten/npu_native_functions_by_codegen.yaml"


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
    wheel = torch_npu_wheel()
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

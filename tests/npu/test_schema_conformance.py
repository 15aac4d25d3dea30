"""The vendored schemas match the running torch's torch-npu release (2.13.0 or 2.10.0.post4), and the
registered ops carry them.

npu:: schemas are compared with the wheel's YAML. atb:: schemas are not in the YAML:
each is compared with the exact string in lib/libop_plugin_atb.so where the library
holds one, otherwise with the 16-byte pieces the compiler split it into, and every
one with its C++ declaration in op_plugin/include/AtbOpsInterface.h. The wheel is
downloaded once (never imported) into $MLA_GRAPH_CACHE or ~/.cache/mla-graph/wheels.
Without network the test fails, unless MLA_GRAPH_OFFLINE=1 says to skip it."""
import functools
import pathlib
import re
import struct
import zipfile

import pytest
import torch
import yaml

from wheels import torch_npu_wheel

from mla_graph.npu import EMULATED_SCHEMAS, ensure_npu_ops

YAML_SUFFIX = "csrc/aten/npu_native_functions_by_codegen.yaml"
ATB_LIBRARY = "torch_npu/lib/libop_plugin_atb.so"
ATB_HEADER_SUFFIX = "op_plugin/include/AtbOpsInterface.h"


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
    assert name in schemas, f"{name} is not in the wheel's YAML"
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


ATB_OPS = sorted(q.split("::")[1] for q in EMULATED_SCHEMAS if q.startswith("atb::"))


@functools.cache
def _wheel_member(wheel: pathlib.Path, suffix: str) -> bytes:
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if n.startswith("torch_npu/") and n.endswith(suffix)]
        assert len(names) == 1, f"expected one torch_npu/...{suffix} in {wheel.name}, found {names}"
        return archive.read(names[0])


def _library_schemas(library: bytes, name: str) -> list[str]:
    """NUL-terminated strings in the library that begin with `name(`: the op's schema strings."""
    return [m.group(1).decode() for m in re.finditer(rb"\0(" + re.escape(name.encode()) + rb"\([^\0]*)\0", library)]


def _elf_section(library: bytes, wanted: str) -> bytes:
    """The bytes of one section of a little-endian ELF64 file."""
    shoff, = struct.unpack_from("<Q", library, 0x28)
    entsize, count, names_index = struct.unpack_from("<HHH", library, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", library, shoff + i * entsize) for i in range(count)]
    names_offset = headers[names_index][4]
    for name, _type, _flags, _addr, offset, size in headers:
        if library[names_offset + name:library.index(b"\0", names_offset + name)].decode() == wanted:
            return library[offset:offset + size]
    raise AssertionError(f"{ATB_LIBRARY} has no {wanted} section")


def _missing_pieces(schema: str, library: bytes) -> list[str]:
    """Pieces of `schema` absent from the library's 16-byte constant pool.

    The compiler inlined the shorter schema strings: it writes one with 16-byte stores
    at offsets 0, 16, 32, ..., taking each value from .rodata.cst16. A tail of more
    than 8 bytes gets one more 16-byte store overlapping the end (both ops checked
    here have one: 9 and 14 bytes); a shorter tail is an immediate in the code,
    which this check does not look at. All pieces being there is a necessary
    condition; the argument order is left to the header test.
    """
    pool = _elf_section(library, ".rodata.cst16")
    constants = {pool[i:i + 16] for i in range(0, len(pool), 16)}
    data = schema.encode()
    starts = list(range(0, len(data) - 15, 16)) + ([len(data) - 16] if len(data) % 16 > 8 else [])
    return [data[s:s + 16].decode() for s in starts if data[s:s + 16] not in constants]


@pytest.mark.parametrize("name", ATB_OPS)
def test_atb_schema_is_in_the_library(name):
    ours = EMULATED_SCHEMAS[f"atb::{name}"]
    library = _wheel_member(torch_npu_wheel(), ATB_LIBRARY)
    found = _library_schemas(library, name)
    if found:
        assert ours in found, f"atb::{name}: our schema\n  {ours}\nis not the library's\n  " + "\n  ".join(found)
    else:
        missing = _missing_pieces(ours, library)
        assert not missing, (f"atb::{name}: {ATB_LIBRARY} holds no {name}( string, and these 16-byte pieces of "
                             f"our schema are not among its inlined constants: {missing}\n  {ours}")


# Types of AtbOpsInterface.h's declarations as schema types; a mutable tensor
# (at::Tensor&) gets the next alias set a, b, ... as torchgen numbers them.
CPP_TYPES = {
    "const at::Tensor&": "Tensor",
    "at::Tensor&": "Tensor!",
    "const c10::optional<at::Tensor>&": "Tensor?",
    "int64_t": "int",
    "double": "float",
    "bool": "bool",
    "c10::optional<c10::string_view>": "str?",
    "at::Tensor": "Tensor",
}


def _cpp_type(cpp: str, name: str) -> str:
    cpp = re.sub(r"\s*([&<>,])\s*", r"\1", cpp.strip())
    assert cpp in CPP_TYPES, f"{ATB_HEADER_SUFFIX}: {name} has C++ type {cpp!r}; expected one of {sorted(CPP_TYPES)}"
    return CPP_TYPES[cpp]


def _header_signature(header: str, name: str) -> str:
    """The C++ declaration of `name` as `name(type arg, ...) -> returns`, without defaults or `*`."""
    found = re.findall(r"TORCH_NPU_API\s+(.+?)\s+" + re.escape(name) + r"\(([^)]*)\);", header)
    assert len(found) == 1, f"{ATB_HEADER_SUFFIX} declares {name}( {len(found)} times, expected once"
    returns, params = found[0]
    args, letters = [], iter("abcdefgh")
    for param in (p for p in params.split(",") if p.strip()):
        cpp, arg = re.fullmatch(r"(.*\W)(\w+)", param.strip()).groups()
        kind = _cpp_type(cpp, f"{name}({arg})")
        if kind == "Tensor!":
            kind = f"Tensor({next(letters)}!)"
        if kind.endswith("?"):   # op-plugin names optional C++ parameters <schema name>_opt
            arg = arg.removesuffix("_opt")
        args.append(f"{kind} {arg}")
    returns = returns.replace(" ", "")
    if returns == "void":
        outs = "()"
    else:
        inner = re.fullmatch(r"std::tuple<(.*)>", returns)
        types = [_cpp_type(t, f"{name} return") for t in (inner.group(1).split(",") if inner else [returns])]
        outs = f"({', '.join(types)})" if inner else types[0]
    return f"{name}({', '.join(args)}) -> {outs}"


def _schema_type(t: torch.Type) -> str:
    return f"{_schema_type(t.getElementType())}?" if isinstance(t, torch.OptionalType) else str(t)


def _our_signature(schema: str) -> str:
    """Our schema in _header_signature's form: alias annotations kept, defaults and `*` dropped."""
    parsed = torch._C.parse_schema(schema)

    def typed(arg) -> str:
        kind = _schema_type(arg.type)
        if arg.alias_info is not None:
            kind = f"{kind}({'|'.join(sorted(arg.alias_info.after_set))}{'!' if arg.alias_info.is_write else ''})"
        return kind

    args = ", ".join(f"{typed(a)} {a.name}" for a in parsed.arguments)
    outs = [typed(r) for r in parsed.returns]
    returns = outs[0] if len(outs) == 1 else f"({', '.join(outs)})"
    return f"{parsed.name}({args}) -> {returns}"


@pytest.mark.parametrize("name", ATB_OPS)
def test_atb_schema_matches_cpp_declaration(name):
    header = _wheel_member(torch_npu_wheel(), ATB_HEADER_SUFFIX).decode()
    declared = _header_signature(header, name)
    ours = _our_signature(EMULATED_SCHEMAS[f"atb::{name}"])
    assert ours == declared, f"atb::{name} differs from its C++ declaration:\n  ours:   {ours}\n  header: {declared}"

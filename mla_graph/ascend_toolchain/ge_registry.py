"""GE ops' input dtype lists, read from the wheel's text (never imported for this).

Sources: torchair's auto_generated_ge_raw_ops.py (one function per GE op, its docstring is the
IR: `.INPUT(query, TensorType({DT_INT8, DT_FLOAT16, DT_BF16}))`, `.OPTIONAL_INPUT(...)`,
`.DYNAMIC_INPUT(key, ...)`, `.DATATYPE(T, ...)` for "T" inputs) and GE's graph/types.h, which
defines the named classes (`TensorType::IndexNumberType()` = {DT_INT32, DT_INT64}, ...).
The lists are a snapshot, sometimes stale: KNOWN_STALE turns documented gaps into notes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# Spellings the IR text uses for the enum names of ge_ir.proto (typos included, as GE's text has them).
DTYPE_ALIASES = {
    "DT_FLOAT32": "DT_FLOAT", "DT_FP32": "DT_FLOAT", "DT_HALF": "DT_FLOAT16", "DT_FP16": "DT_FLOAT16",
    "DT_BFLOAT16": "DT_BF16", "DT_FLOAT64": "DT_DOUBLE", "DT_FP8_E5M2": "DT_FLOAT8_E5M2",
    "DT_FP8_E4M3FN": "DT_FLOAT8_E4M3FN", "DT_FLOAT8_E4M3": "DT_FLOAT8_E4M3FN", "DT_FLOAT_E1M2": "DT_FLOAT4_E1M2",
    "DT_COMPLEXT64": "DT_COMPLEX64", "DT_RESOURSE": "DT_RESOURCE",
}

# (GE op, IR input) -> (dtypes the IR omits but the op runs with, why we believe so). A dtype in
# here is reported as a "note", not an "error".
KNOWN_STALE: dict[tuple[str, str], tuple[frozenset[str], str]] = {
    **{("InterleaveRope", name): (frozenset({"DT_BF16"}),
                                  "the IR lists fp16 only, but vllm-ascend runs npu_interleave_rope on "
                                  "DeepSeek's bf16 activations") for name in ("x", "cos", "sin")},
    ("Identity", "x"): (frozenset({"DT_BF16"}),
                        "torchair's own aten.clone and air.wait_tensor converters emit Identity for any dtype, "
                        "bf16 included, without a cast"),
    ("TensorMove", "x"): (frozenset({"DT_BF16"}),
                          "torchair's own npu_mla_prolog_v3_functional converter copies the bf16 kv/kr caches with "
                          "TensorMove before MlaPrologV3 (ge_converter/custom/flash_attention.py), whose IR takes "
                          "bf16 caches"),
    **{("ScatterUpdate", name): (frozenset({"DT_BF16"}),
                                 "the IR omits bf16, but torch-npu 2.13.0's scatter_update docs "
                                 "(_op_plugin_docs.py) list bfloat16 for Atlas A2/A3") for name in ("var", "updates")},
}

_DOCSTRING = re.compile(r'"""\s*REG_OP\((\w+)\)(.*?)"""', re.S)
_INPUT = re.compile(r"^\s*\.(INPUT|OPTIONAL_INPUT|DYNAMIC_INPUT)\(\s*(\w+)\s*,\s*(.*?)\)\s*(?:\\n)?\s*$", re.M)
_DATATYPE = re.compile(r"^\s*\.DATATYPE\(\s*(\w+)\s*,\s*(.*?)\)\s*(?:\\n)?\s*$", re.M)
_CLASS = re.compile(r"static TensorType (\w+)\(\)\s*\{\s*return TensorType\{([^}]*)\};", re.S)


@dataclass(frozen=True)
class GeInputSpec:
    name: str                      # the IR name ('key'; a dynamic input appears in the graph as key0, key1...)
    kind: str                      # INPUT, OPTIONAL_INPUT or DYNAMIC_INPUT
    dtypes: frozenset[str] | None  # enum names ('DT_INT64'); None: the IR text cannot be read as a list
    declared: str                  # the IR's own text, for messages


def parse_type_classes(types_h: str) -> tuple[dict[str, frozenset[str]], frozenset[str]]:
    """GE's named TensorType classes ({'IndexNumberType': {DT_INT32, DT_INT64}, ...}) and the
    DataType enum's names, from graph/types.h."""
    classes = {name: frozenset(re.findall(r"DT_\w+", body)) for name, body in _CLASS.findall(types_h)}
    enum = re.search(r"enum DataType \{(.*?)\};", types_h, re.S)
    if not classes or enum is None:
        raise ValueError("graph/types.h has no `static TensorType X() { return TensorType{...}; }` classes "
                         "or no `enum DataType`; expected GE's header from torch-npu 2.13.0")
    names = frozenset(re.findall(r"(DT_\w+) =", enum.group(1))) - {"DT_MAX"}
    return classes, names


def _dtypes(expr: str, classes: dict[str, frozenset[str]], known: frozenset[str]) -> frozenset[str] | None:
    """The union of every dtype and class named in `expr`; None if any word is not one of them."""
    by_lower = {name.lower(): dtypes for name, dtypes in classes.items()}
    result: set[str] = set()
    for word in re.findall(r"[A-Za-z_]\w*", expr):
        if word == "TensorType":
            continue
        name = DTYPE_ALIASES.get(word.upper(), word.upper())
        name = name if name.startswith("DT_") else DTYPE_ALIASES.get(f"DT_{name}", f"DT_{name}")
        if word.lower() in by_lower:
            result |= by_lower[word.lower()]
        elif name in known:
            result.add(name)
        else:
            return None
    return frozenset(result) or None


def parse_ge_ops(raw_ops: str, types_h: str) -> dict[str, dict[str, GeInputSpec]]:
    """{GE op type: {IR input name: GeInputSpec}} for every REG_OP docstring in `raw_ops`."""
    classes, known = parse_type_classes(types_h)
    ops: dict[str, dict[str, GeInputSpec]] = {}
    for op_type, body in _DOCSTRING.findall(raw_ops):
        symbols = {symbol: expr for symbol, expr in _DATATYPE.findall(body)}
        inputs = {}
        for kind, name, expr in _INPUT.findall(body):
            symbol = expr.strip().strip('"')
            text = symbols.get(symbol, expr) if expr.strip().startswith('"') else expr
            dtypes = None if text.strip().startswith('"') else _dtypes(text, classes, known)
            inputs[name] = GeInputSpec(name, kind, dtypes, expr if text == expr else f"{expr} = {text}")
        ops[op_type] = inputs
    if not ops:
        raise ValueError('no `"""REG_OP(Name)` docstrings found; expected torchair\'s auto_generated_ge_raw_ops.py')
    return ops


def input_spec(ops: dict[str, dict[str, GeInputSpec]], op_type: str, desc_name: str) -> GeInputSpec | None:
    """The IR input behind a graph input descriptor: 'key0' is DYNAMIC_INPUT 'key'."""
    inputs = ops.get(op_type, {})
    if desc_name in inputs:
        return inputs[desc_name]
    base = desc_name.rstrip("0123456789")
    spec = inputs.get(base)
    return spec if spec is not None and spec.kind == "DYNAMIC_INPUT" else None

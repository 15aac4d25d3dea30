"""Check every GE op's input dtypes against the op's registered TensorType list.

Unchecked, and named in conversion.unchecked instead: ops the IR registry lacks (Cast is
hand-written in torchair), inputs whose IR text is not a dtype list (`"T"` without a
`.DATATYPE`, typos such as `DI_UINT16`), and inputs whose descriptor has no dtype yet
(DT_UNDEFINED: GE infers it when compiling). A dtype listed in ge_registry.KNOWN_STALE for that
input is a "note" carrying the reason, any other mismatch an "error".
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .findings import GeFinding
from .ge_registry import KNOWN_STALE, input_spec
from .toolchain import Toolchain, load

if TYPE_CHECKING:
    from .ge_convert import GeConversion

# Graph plumbing that the IR registry does not list.
FRAMEWORK_OPS = frozenset({"Data", "RefData", "NetOutput", "Const", "Constant"})

_TORCH_NAMES = {
    "DT_FLOAT": "torch.float32", "DT_FLOAT16": "torch.float16", "DT_BF16": "torch.bfloat16",
    "DT_DOUBLE": "torch.float64", "DT_INT8": "torch.int8", "DT_UINT8": "torch.uint8", "DT_INT16": "torch.int16",
    "DT_INT32": "torch.int32", "DT_INT64": "torch.int64", "DT_BOOL": "torch.bool",
}


def check_ge_dtypes(conversion: GeConversion, toolchain: Toolchain | None = None) -> list[GeFinding]:
    """Findings for `conversion.ops` whose input dtypes the GE IR does not allow; also fills
    conversion.unchecked with the inputs whose allowed dtypes are unknown."""
    registry = (toolchain or load()).ge_ops()
    producers = {op.name: op for op in conversion.ops}
    findings = []
    unchecked = dict.fromkeys(conversion.unchecked)
    for op in conversion.ops:
        if op.type in FRAMEWORK_OPS or op.stand_in:
            continue
        where = op.fx_node or op.name
        if op.type not in registry:
            unchecked.setdefault(f"{op.type}: not in the IR registry")
            continue
        for given in op.inputs:
            spec = input_spec(registry, op.type, given.name)
            if spec is None or spec.dtypes is None or given.dtype == "DT_UNDEFINED":
                why = "no dtype recorded" if given.dtype == "DT_UNDEFINED" else spec.declared if spec else "not in the IR"
                unchecked.setdefault(f"{op.type}.{given.name}: {why}")
                continue
            if given.dtype in spec.dtypes:
                continue
            producer = producers.get(given.source.rsplit(":", 1)[0])
            origin = f"FX node {producer.fx_node}" if producer and producer.fx_node else f"GE {given.source}"
            allowed = sorted(spec.dtypes)
            message = (f"{op.type} input {given.name} is {given.dtype} (from {origin}); the GE IR allows "
                       f"{', '.join(allowed)} ({spec.declared})")
            stale_dtypes, reason = KNOWN_STALE.get((op.type, spec.name), (frozenset(), ""))
            if given.dtype in stale_dtypes:
                findings.append(GeFinding("note", "ge-dtype", where, op.type, f"{message}; known stale: {reason}",
                                          "nothing to change unless the op rejects it on the device"))
                continue
            wanted = " or ".join(_TORCH_NAMES.get(d, d) for d in allowed[:3])
            findings.append(GeFinding("error", "ge-dtype", where, op.type, message,
                                      f"give {spec.name} dtype {wanted} before it reaches {where}"))
    conversion.unchecked[:] = list(unchecked)
    return findings

"""FX graph -> GE graph with torchair's own converters, without dynamo and without CANN.

    conversion = convert_to_ge(gm)         # gm's placeholders carry node.meta["val"]
    conversion.ops                          # [GeOp(name, type, fx_node, inputs=[GeInput(name, source, dtype)])]
    conversion.findings                     # ge-no-converter, ge-convert-error, ge-dtype
    conversion.write_pbtxt("layer.pbtxt")  # what torchair's graph dump writes

It proves "every node converts, with these GE input dtypes", not "GE compiles it": compiling
needs the CANN runtime. Dtypes are read on the original graph, before torchair's optimisation
passes (which leave some input descriptors incomplete).
"""
from __future__ import annotations

import contextlib
import pathlib
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule, Node

from ..stacks import torch_npu_release
from .findings import GeFinding
from .ge_dtypes import check_ge_dtypes
from .ge_interpreter import tracking_converter_class
from .meta_loader import _NPU_DTYPES
from .graph_inputs import inputs_from_meta, lift_attributes, with_sequence_output
from .toolchain import Toolchain, load

# Targets torchair's parse_node handles itself, without a registered converter.
_HANDLED_WITHOUT_CONVERTER = {"air.scope_enter.default", "air.scope_exit.default", "air.record.default",
                              "air.wait.default", "aten.sym_stride.int", "aten.sym_storage_offset.default"}

@dataclass(frozen=True)
class GeInput:
    name: str      # the op's input descriptor name ('actual_seq_lengths_kv', 'key0')
    source: str    # the producer, "op:index"
    dtype: str     # 'DT_INT64'


@dataclass(frozen=True)
class GeOp:
    name: str
    type: str
    fx_node: str | None                       # the FX node whose conversion emitted it
    inputs: tuple[GeInput, ...] = ()
    stand_in: bool = False                    # a placeholder for a node torchair could not convert


@dataclass
class GeConversion:
    graph: Any                                # torchair's GeConcreteGraph
    ops: list[GeOp]
    findings: list[GeFinding] = field(default_factory=list)
    complete: bool = True                     # False: conversion stopped at a node (see findings)
    unchecked: list[str] = field(default_factory=list)   # 'Op.input: IR text' whose dtypes are unknown

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)

    def op_types(self) -> list[str]:
        return [op.type for op in self.ops]

    def pbtxt(self) -> str:
        from torchair._ge_concrete_graph.utils import convert_to_pbtxt
        return convert_to_pbtxt(self.graph.graph)

    def write_pbtxt(self, path: str | pathlib.Path) -> pathlib.Path:
        path = pathlib.Path(path)
        path.write_text(self.pbtxt())
        return path


def convert_to_ge(gm: GraphModule, example_inputs: list | tuple | None = None,
                  toolchain: Toolchain | None = None) -> GeConversion:
    """Convert `gm` with torchair's converters and check every GE op's input dtypes.

    example_inputs default to uninitialised CPU tensors shaped like each placeholder's
    node.meta["val"] (static shapes only); torchair only runs meta functions on them. Tensor
    attributes (weights) become trailing graph inputs, as dynamo + AOT autograd present them."""
    toolchain = toolchain or load()
    from torchair._ge_concrete_graph.fx2ge_converter import GeConcreteGraph
    from torchair.configs.compiler_config import CompilerConfig

    gm, weights = lift_attributes(with_sequence_output(gm))
    inputs = list(example_inputs) if example_inputs is not None else inputs_from_meta(gm, len(weights))
    inputs += weights
    findings = _missing_converters(gm)
    graph = GeConcreteGraph(CompilerConfig(), name=gm.__class__.__name__)
    converter = tracking_converter_class()(gm, graph=graph, garbage_collect_values=False)
    complete = True
    try:
        with _torch_npu_dtypes():
            converter.run(*inputs)
    except Exception as error:  # even the stand-in failed (e.g. the fake kernel raised): stop here
        complete = False
        converter.failures.append((converter.current, error))
    flagged = {f.node for f in findings}
    findings += [_convert_error(node, error, stopped=not complete and node is converter.current)
                 for node, error in converter.failures if node is None or node.name not in flagged]
    ops = _ge_ops(graph.graph, converter.owners, converter.stand_ins)
    conversion = GeConversion(graph, ops, findings, complete)
    conversion.findings += check_ge_dtypes(conversion, toolchain)
    return conversion


@contextlib.contextmanager
def _torch_npu_dtypes():
    """Some converters (npu_mla_prolog_v3's among them) `import torch_npu` for its own dtype codes
    (torch_npu.hifloat8, ...): a module with just those stands in while they run, then goes, so
    torch_npu stays unimportable for everyone else (mla_graph.npu.npu_backend)."""
    if "torch_npu" in sys.modules:
        yield
        return
    stand_in = types.ModuleType("torch_npu")
    stand_in.__dict__.update(_NPU_DTYPES)
    sys.modules["torch_npu"] = stand_in
    try:
        yield
    finally:
        del sys.modules["torch_npu"]


def _convert_error(node: Node | None, error: Exception, stopped: bool) -> GeFinding:
    where = node.name if node is not None else "<graph>"
    target = _target_name(node.target) if node is not None else "-"
    first_line = (str(error).strip().splitlines() or [""])[0][:300]
    if stopped:
        return GeFinding("error", "ge-convert-error", where, target,
                         f"conversion stopped here: {type(error).__name__}: {first_line}",
                         "fix this node; the nodes after it were not converted")
    return GeFinding("error", "ge-convert-error", where, target,
                     f"torchair's converter raised {type(error).__name__}: {first_line}",
                     "lower this node to ops torchair converts (a stand-in op took its place in the GE graph)")


def _missing_converters(gm: GraphModule) -> list[GeFinding]:
    from torchair._ge_concrete_graph.fx2ge_converter import _CONVERTERS

    findings = []
    for node in (n for n in gm.graph.nodes if n.op == "call_function"):
        target = node.target
        if not isinstance(target, torch._ops.OpOverload) or str(target) in _HANDLED_WITHOUT_CONVERTER:
            continue
        if getattr(target, "_ge_converter", None) is None and _CONVERTERS.get(target) is None:
            findings.append(GeFinding(
                "error", "ge-no-converter", node.name, _target_name(target),
                f"torchair {torch_npu_release()} registers no GE converter for {_target_name(target)}; on a CANN host it would "
                f"try to generate one from the GE op registry",
                "lower this node to ops torchair converts, or check the GE op exists in CANN"))
    return findings


def _ge_ops(ge_graph: Any, owners: dict[str, str], stand_ins: set[str]) -> list[GeOp]:
    from torchair._ge_concrete_graph.ge_ir_pb2 import DataType

    protos = {op.name: op for op in ge_graph._proto.op}
    ops = []
    for op in ge_graph._proto.op:
        sources = [name for name in op.input if not name.endswith(":-1")]   # ":-1" is a control edge
        inputs = tuple(GeInput(desc.name, source, _dtype_name(DataType.Name(desc.dtype), protos, source))
                       for source, desc in zip(sources, op.input_desc) if source)
        ops.append(GeOp(op.name, op.type, owners.get(op.name), inputs, op.name in stand_ins))
    return ops


def _dtype_name(recorded: str, protos: dict[str, Any], source: str) -> str:
    """The recorded dtype, or for DT_UNDEFINED out of a Cast the Cast's dst_type: torchair leaves
    the output descriptor of a Cast inside a converter empty."""
    from torchair.ge._ge_graph import DataType as GeDataType   # GE's C++ enum values, not the proto's

    producer = protos.get(source.rsplit(":", 1)[0])
    if recorded != "DT_UNDEFINED" or producer is None or producer.type != "Cast" or "dst_type" not in producer.attr:
        return recorded
    names = {value: name for name, value in vars(GeDataType).items() if name.startswith("DT_")}
    return names.get(producer.attr["dst_type"].i, recorded)


def _target_name(target: Any) -> str:
    return str(target) if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", str(target))

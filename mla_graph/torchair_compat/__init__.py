"""Check an FX graph against torchair's GE graph mode (torch-npu 2.13.0) before compiling it.

    report = check_torchair(bucket_graph)
    print(report.table())      # what was checked, then severity, rule, node, op, message, suggestion
    report.ok                  # no error findings in what was checked (report.checked)

Always: the vendored converter list (mla_graph/data/ge_converters-<release>.txt, regenerated from a wheel
by tools/sync_ge_converters.py). Where the torch-npu 2.13.0 wheel is available
(mla_graph.ascend_toolchain): torchair's own converters and the GE IR's dtype lists, the wheel's
meta functions, and the documented kernel limits (advisory ones as notes). ensure_air_ops() makes
torchair's air:: ops exist on hosts without torchair.
"""
from ..npu.air_ops import AIR_SCHEMAS, ensure_air_ops
from .converters import ConverterTable, load_converters, parse_table
from .report import HARDWARE_ONLY, RULES, Finding, GeOpRow, TorchairReport
from .rules import check_torchair

__all__ = ["AIR_SCHEMAS", "ConverterTable", "Finding", "GeOpRow", "HARDWARE_ONLY", "RULES", "TorchairReport",
           "check_torchair", "ensure_air_ops", "load_converters", "parse_table"]

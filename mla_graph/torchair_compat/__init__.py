"""Check an FX graph against torchair's GE graph mode (torch-npu 2.13.0) before compiling it.

    report = check_torchair(lowered.graph_for("decode"))
    if not report.ok:
        print(report.table())      # rule, node, op, message, suggestion

The converter list is vendored data (mla_graph/data/ge_converters.txt), regenerated from a
wheel by tools/sync_ge_converters.py. ensure_air_ops() makes torchair's air:: scope and
wait_tensor ops exist on hosts without torchair.
"""
from .air_ops import AIR_SCHEMAS, ensure_air_ops
from .converters import ConverterTable, load_converters, parse_table
from .report import RULES, Finding, TorchairReport
from .rules import check_torchair

__all__ = ["AIR_SCHEMAS", "ConverterTable", "Finding", "RULES", "TorchairReport", "check_torchair",
           "ensure_air_ops", "load_converters", "parse_table"]

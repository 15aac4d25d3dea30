"""The real Ascend toolchain's Python checks, run on a CPU host from the torch-npu 2.13.0 wheel.

    from mla_graph import ascend_toolchain as at
    if at.available():                           # a cached wheel, no real torch_npu here
        conversion = at.convert_to_ge(gm)        # torchair's own FX -> GE converters
        conversion.findings                      # ge-no-converter, ge-convert-error, ge-dtype
        at.compare_with_wheel_meta(gm)           # torch-npu's own meta functions vs our fake kernels

The wheel is unpacked beside itself and never installed; torch_npu stays unimportable (our
emulated npu:: and air:: ops keep their kernels). load() imports torchair once per process,
which takes a few seconds. Each module says how its part works: wheel (where the wheel lives),
torchair_import (importing torchair without CANN), toolchain (load once), graph_inputs and
ge_interpreter (feeding an FX graph to torchair's converter), ge_registry / ge_dtypes (the GE IR's
dtype lists), meta_loader / meta_compare (the wheel's meta functions), findings (what they report).
"""
from .findings import RULES, GeFinding
from .ge_convert import GeConversion, GeInput, GeOp, convert_to_ge
from .ge_dtypes import check_ge_dtypes
from .meta_compare import compare_with_wheel_meta, wheel_meta
from .toolchain import Toolchain, available, load, status
from .wheel import ToolchainUnavailable, fetch_wheel, find_wheel

__all__ = ["GeConversion", "GeFinding", "GeInput", "GeOp", "RULES", "Toolchain", "ToolchainUnavailable", "available",
           "check_ge_dtypes", "compare_with_wheel_meta", "convert_to_ge", "fetch_wheel", "find_wheel", "load",
           "status", "wheel_meta"]

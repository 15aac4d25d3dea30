"""torch-npu ops used by the MLA lowering, emulated on hosts without an Ascend NPU.

Call ensure_npu_ops() before using torch.ops.npu.* / torch.ops.atb.*; on a
torch_npu host it registers nothing and the real kernels are used.
"""
from mla_graph.npu.registry import EMULATED_SCHEMAS, ensure_npu_ops, npu_backend

__all__ = ["EMULATED_SCHEMAS", "ensure_npu_ops", "npu_backend"]

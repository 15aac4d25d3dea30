"""Graph -> graph passes over captured MLA graphs, and the manager that runs them.

A pass never imports vLLM, torch_npu or the CLI: it sees a GraphModule and returns a PassResult.
"""
from .base import Invariant, PassResult, graph_pass, has_ops, no_namespace, no_ops, op_name, pass_name
from .cleanup import eliminate_dead_code, remove_noop_views
from .manager import PassManager, PassRecord, PipelineReport, op_histogram
from .verifier import PassVerificationError, verify_graph

__all__ = [
    "Invariant", "PassManager", "PassRecord", "PassResult", "PassVerificationError", "PipelineReport",
    "eliminate_dead_code", "graph_pass", "has_ops", "no_namespace", "no_ops", "op_histogram", "op_name",
    "pass_name", "remove_noop_views", "verify_graph",
]

"""torch.compile backend "mla_graph" (entry point in group torch_dynamo_backends).

`backend` holds the backend; `mla_graph.layer_op` the `mla::layer` op through which MLAAttention shows up
in Dynamo's graph as one node per layer.
"""
from .backend import BACKEND_NAME, BackendOptions, lowered_for, mla_graph_backend

__all__ = ["BACKEND_NAME", "BackendOptions", "lowered_for", "mla_graph_backend"]

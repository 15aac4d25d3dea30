"""Prepare an FX graph the way dynamo + AOT autograd hand one to torchair: a tuple output,
weights as trailing inputs, and example inputs made from the placeholders' fake values."""
from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule, Node


def inputs_from_meta(gm: GraphModule, lifted: int) -> list:
    """Inputs for all but the last `lifted` placeholders: uninitialised CPU tensors with each
    node.meta["val"]'s shape, strides and dtype (never touched, so never paged in), or its number."""
    inputs = []
    placeholders = gm.graph.find_nodes(op="placeholder")
    for node in placeholders[:len(placeholders) - lifted]:
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            shape, stride = _static(node, value.shape), _static(node, value.stride())
            inputs.append(torch.empty_strided(shape, stride, dtype=value.dtype))
        elif isinstance(value, (int, float, bool)):
            inputs.append(value)
        elif value is None:
            raise ValueError(f"placeholder {node.name} has no node.meta['val']; pass example_inputs to convert_to_ge")
        else:
            inputs.append(_static(node, [value])[0])
    return inputs


def _static(node: Node, sizes) -> list[int]:
    try:
        return [int(s) for s in sizes]
    except (TypeError, ValueError) as error:   # an unbacked or unhinted SymInt
        raise ValueError(f"placeholder {node.name} has symbolic sizes {list(sizes)}; convert_to_ge needs static "
                         f"shapes in node.meta['val'] or explicit example_inputs") from error


def with_sequence_output(gm: GraphModule) -> GraphModule:
    """torchair expects the graph to return a tuple or list; wrap a single output in a copy."""
    (output,) = gm.graph.find_nodes(op="output")
    if isinstance(output.args[0], (tuple, list)):
        return gm
    graph = torch.fx.Graph()
    value = graph.graph_copy(gm.graph, {}, return_output_node=False)
    graph.output((value,))
    return GraphModule(gm, graph)


def lift_attributes(gm: GraphModule) -> tuple[GraphModule, list[torch.Tensor]]:
    """Turn tensor get_attr nodes (weights) into trailing placeholders, as dynamo + AOT autograd
    present them to torchair; returns the new module and the tensors to pass for them."""
    attrs = [n for n in gm.graph.nodes if n.op == "get_attr" and isinstance(_attribute(gm, n), torch.Tensor)]
    if not attrs:
        return gm, []
    graph, env = torch.fx.Graph(), {}
    for node in gm.graph.find_nodes(op="placeholder"):
        env[node] = graph.node_copy(node, env.__getitem__)
    for node in attrs:
        env[node] = graph.placeholder(node.name)
        env[node].meta = dict(node.meta)
    for node in gm.graph.nodes:
        if node not in env:
            env[node] = graph.node_copy(node, env.__getitem__)
    return GraphModule(gm, graph), [_attribute(gm, n).detach() for n in attrs]


def _attribute(gm: GraphModule, node: Node) -> Any:
    value = gm
    for part in node.target.split("."):
        value = getattr(value, part)
    return value

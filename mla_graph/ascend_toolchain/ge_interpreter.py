"""torchair's FX interpreter (_NpuGraphConverter), instrumented for checking.

Three additions to torchair's own class:
- it records which FX node emitted each GE op (GeOp.fx_node);
- air.scope_enter/exit push and pop GE attributes the way torchair's own kernels for them do
  (ours, registered first, do nothing), so multistream graphs carry `_user_stream_label`;
- a node whose converter raises becomes a stand-in GE op of type str(target), built the way
  torchair's record-ascend-IR mode mocks unconvertible nodes, so conversion goes on and every
  later node is still converted and checked; `failures` lists the nodes and their errors.
"""
from __future__ import annotations

import functools
from typing import Any

from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx import Node


@functools.cache
def tracking_converter_class() -> type:
    from torchair._ge_concrete_graph.fx2ge_converter import set_ge_outputs
    from torchair.npu_fx_compiler import _NpuGraphConverter, _unpack_meta
    from torchair.scope import _scope_attr

    scope_ops = {
        "air.scope_enter.default": lambda keys, values, need_execute=False: _scope_attr.scope_enter(keys, values),
        "air.scope_exit.default": lambda need_execute=False: _scope_attr.scope_exit(),
    }

    class TrackingConverter(_NpuGraphConverter):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.current: Node | None = None
            self.owners: dict[str, str] = {}          # GE op name -> FX node name
            self.stand_ins: set[str] = set()          # GE op names standing in for failed nodes
            self.failures: list[tuple[Node, Exception]] = []

        def run_node(self, n: Node) -> Any:
            self.current = n
            ops = self._graph.graph._proto.op
            before = len(ops)
            try:
                result = super().run_node(n)
            except Exception as error:  # converters raise anything; the stand-in keeps the walk going
                if n.op != "call_function":
                    raise
                del ops[before:]
                result = self._stand_in(n)
                self.failures.append((n, error))
                self.stand_ins.update(op.name for op in ops[before:])
            self.owners.update({op.name: n.name for op in ops[before:]})
            return result

        def call_function(self, target, args, kwargs) -> Any:
            if str(target) in scope_ops:
                return scope_ops[str(target)](*args, **kwargs)
            return super().call_function(target, args, kwargs)

        def _stand_in(self, n: Node) -> Any:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            args_meta, kwargs_meta = _unpack_meta(args, kwargs)
            with detect_fake_mode(None) or FakeTensorMode(allow_non_fake_inputs=True):
                meta_outputs = n.target(*args_meta, **kwargs_meta)
            args_npu, kwargs_npu = self._unpack_npu(args, kwargs)
            with self._graph.converter_context(node=n):
                ge_outputs = self._graph._create_mock_node_for_op(n.target, args_npu, kwargs_npu)
            if meta_outputs is not None:
                set_ge_outputs(ge_outputs, meta_outputs)
            return self._get_value_pack(meta_outputs, ge_outputs)

    return TrackingConverter

"""The runtime half: how a lowered graph is called.

binding     a graph's signature (GraphMeta.inputs) bound to one call: each input derived by key
            (mla_graph.inputs), per-step inputs once per model step (StepMemo, owned by the modules
            of one model, not a global)
graph_mode  static-shape graphs per batch bucket: the options (TorchairOptions, parsed once), the
            bucket choice and padding, the compiler (torchair, or the stand-in off Ascend), and the
            one bucket runner both per-layer decode graphs and whole decode steps run through
whole_step  whole-model decode steps of the torch.compile backend: every layer inlined into
            Dynamo's graph, run through the bucket runner
"""

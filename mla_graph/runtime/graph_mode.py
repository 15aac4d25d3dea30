"""Graph-mode decode: static batch buckets, one compiled graph per bucket (BucketRunner).

On an Ascend host the lowered decode graph is compiled by torchair
(`torchair.get_npu_backend(compiler_config=...)`). Elsewhere the same graph goes through
`torch.compile(..., fullgraph=True, dynamic=False)` with a stand-in backend that records each
compiled graph (so tests can prove one graph per bucket, no graph breaks, no recompilation when
a bucket is reused) and then runs it through the emulated kernels.
"""
from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.fx import GraphModule

from ..cache import PADDING_BLOCK
from ..contract import HIDDEN_STATES, find_input, graph_meta
from ..inputs import Call
from ..metadata import MAX_DECODE_TOKENS, MLAMetadata
from .binding import CallingConvention, StepMemo


@dataclass(frozen=True)
class TorchairOptions:
    graph_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    # multi-token decodes (speculative decoding): tokens per request of each graph, 1 + the draft tokens
    # (vLLM's num_speculative_tokens gives it); a graph per (batch size, tokens per request)
    graph_decode_tokens: tuple[int, ...] = (2, 4)
    max_blocks_per_req: int | None = None   # block-table width compiled in; default: max positions / block
    mode: str = "max-autotune"              # torchair CompilerConfig.mode: GE graph, the only mode air FIA runs in
    frozen_parameter: bool = True
    tiling_schedule_optimize: bool = True

    def bucket(self, count: int) -> int | None:
        """The smallest graph batch size that holds `count` requests, or None past the largest: the one
        place a bucket is chosen (the per-layer runner and the whole-step runner both ask here)."""
        return next((size for size in self.graph_batch_sizes if size >= count), None)

    def tokens_bucket(self, longest: int) -> int | None:
        """The smallest graph_decode_tokens that holds a decode of `longest` new tokens, or None."""
        return next((size for size in self.graph_decode_tokens if size >= longest), None)

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> "TorchairOptions":
        """Parse and check the options (called by Target.parse, once per lowering)."""
        options = dict(options or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"unknown torchair option(s) {unknown}; valid options: {', '.join(valid)}")
        if "graph_batch_sizes" in options:
            given = options["graph_batch_sizes"]
            if (isinstance(given, (str, bytes)) or not hasattr(given, "__iter__")
                    or not list(given) or any(type(s) is not int or s < 1 for s in given)):
                raise ValueError(f"torchair option graph_batch_sizes must be a non-empty list of positive ints "
                                 f"(batch buckets, e.g. [1, 2, 4, 8]), got {given!r}")
            options["graph_batch_sizes"] = tuple(sorted(set(given)))
        if "graph_decode_tokens" in options:
            given = options["graph_decode_tokens"]
            if (isinstance(given, (str, bytes)) or not hasattr(given, "__iter__") or not list(given)
                    or any(type(s) is not int or not 1 <= s <= MAX_DECODE_TOKENS for s in given)):
                raise ValueError(f"torchair option graph_decode_tokens must be a non-empty list of ints in "
                                 f"1..{MAX_DECODE_TOKENS} (tokens per request of the multi-token decode graphs: 1 "
                                 f"+ the draft tokens, at most FIA's MLA limit), got {given!r}")
            options["graph_decode_tokens"] = tuple(sorted(set(given)))
        if "max_blocks_per_req" in options:
            given = options["max_blocks_per_req"]
            if given is not None and (type(given) is not int or given < 1):
                raise ValueError(f"torchair option max_blocks_per_req must be a positive int (the block-table "
                                 f"width compiled in) or None (max_position_embeddings / block_size), got {given!r}")
        for name in ("frozen_parameter", "tiling_schedule_optimize"):
            if name in options and not isinstance(options[name], bool):
                raise ValueError(f"torchair option {name} must be True or False, got {options[name]!r}")
        if options.get("mode", "max-autotune") != "max-autotune":
            raise ValueError(f"mode must be 'max-autotune', got {options['mode']!r}: the decode graph's attention "
                             "is torchair's air npu_fused_infer_attention_score, which runs only in GE graph "
                             "mode (max-autotune); its kernel raises in reduce-overhead (aclgraph) mode "
                             "(torch-npu 2.13.0, torchair/ops/_npu_fused_infer_attention_score.py)")
        return cls(**options)


@dataclass
class StandInBackend:
    """Does what torchair's backend does before GE, then records instead of compiling: an AOT trace
    to a functionalized aten graph (input mutations kept as copy_ into the inputs), which is what
    torchair's converters see. Runs that graph eagerly through the emulated kernels."""

    graphs: list[GraphModule] = field(default_factory=list)

    def __call__(self, gm: GraphModule, example_inputs: list) -> Callable:
        from functorch.compile import make_boxed_func
        from torch._functorch.aot_autograd import aot_module_simplified

        def record(aten_graph: GraphModule, inputs: list) -> Callable:
            self.graphs.append(aten_graph)
            return make_boxed_func(aten_graph.forward)

        return aot_module_simplified(gm, example_inputs, fw_compiler=record, keep_inference_input_mutations=True)


def _torchair_backend(options: TorchairOptions) -> Callable:
    import torchair  # only on Ascend hosts (ships inside torch_npu)

    config = torchair.CompilerConfig()
    config.mode = options.mode
    config.experimental_config.frozen_parameter = options.frozen_parameter
    config.experimental_config.tiling_schedule_optimize = options.tiling_schedule_optimize
    return torchair.get_npu_backend(compiler_config=config)


class BucketRunner:
    """The one bucket runner: a function compiled into one static-shape graph per batch bucket, by
    torchair on an Ascend host, by the stand-in elsewhere, with its own Dynamo cache and recompile
    budget. Per-layer decode graphs (BucketedDecode) and whole decode steps (whole_step.WholeStep)
    both run through it; the bucket itself is chosen by TorchairOptions.bucket."""

    def __init__(self, method: Callable, name: str, options: TorchairOptions, on_npu: bool) -> None:
        self.options = options
        self.on_npu = on_npu
        self.graphs: list[GraphModule] = []     # what the stand-in compiled (on Ascend torchair does not expose them)
        self.backend = _torchair_backend(options) if on_npu else StandInBackend(self.graphs)
        self.buckets_run: list[int] = []
        self._compiled = torch.compile(own_code(method, name), backend=self.backend, fullgraph=True, dynamic=False)
        self._limits = recompile_limits(options.graph_batch_sizes)

    def __call__(self, size: int, *inputs: Any, warmup: bool = False) -> Any:
        """Run the graph of bucket `size` (compiled on its first use) on inputs padded to it; a warmup
        run compiles it and is not counted in buckets_run."""
        if not warmup:
            self.buckets_run.append(size)
        with torch.no_grad(), torch._dynamo.config.patch(**self._limits):
            return self._compiled(*inputs)


class BucketedDecode:
    """Runs a decode graph at the smallest configured batch size that fits, padding the batch:
    padded tokens write into the padding block (cache.PADDING_BLOCK, which no request owns and
    nothing reads; the fused prolog admits no -1 slot), see no context (seq_len 0), and are
    dropped. A request's own slot -1 (write nothing) is sent to the padding block too."""

    def __init__(self, gm: GraphModule, options: TorchairOptions) -> None:
        from ..npu import npu_backend

        self.gm = gm
        self.convention = CallingConvention.of(gm)
        self.options = options
        self.block_size = block_size = self.convention.block_size
        self.width = options.max_blocks_per_req or -(-self.convention.config.max_position_embeddings // block_size)
        lists = [i.name for i in graph_meta(gm).inputs if i.on == "host"]
        if lists:
            raise ValueError(f"graph mode needs every input as a tensor; this graph takes host lists {lists}")
        self.runner = BucketRunner(self._step, f"mla_decode_step_{id(self):x}", options,
                                   on_npu=npu_backend() == "torch_npu")

    @property
    def on_npu(self) -> bool:
        return self.runner.on_npu

    @property
    def backend(self) -> Any:
        return self.runner.backend

    @property
    def buckets_run(self) -> list[int]:
        return self.runner.buckets_run

    def _step(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.gm(*tensors)

    def bucket_for(self, num_reqs: int) -> int:
        size = self.options.bucket(num_reqs)
        if size is None:
            raise ValueError(f"decode batch of {num_reqs} requests exceeds the largest graph batch size "
                             f"{self.options.graph_batch_sizes[-1]}; add a larger size to graph_batch_sizes")
        return size

    def _padded(self, call: Call, size: int) -> Call:
        return Call(_pad_rows(call.hidden_states, size, 0), _pad_rows(call.positions, size, 0), call.kv_cache,
                    _pad_metadata(call.metadata, size, self.width, self.block_size), call.cos_sin)

    def warmup(self, kv_cache, cos_sin: torch.Tensor, sizes: tuple[int, ...] | None = None) -> list[GraphModule]:
        """Compile the graph of each bucket ahead of serving, with a dummy batch in which every
        request is padding (written into the padding block, seq_len 0). Returns the graphs handed
        to the compiler (the stand-in records them; on Ascend, torchair does not expose them)."""
        empty = self._empty_call(kv_cache, cos_sin)
        graphs = []
        for size in sizes or self.options.graph_batch_sizes:
            padded = self._padded(empty, size)
            before = len(self.runner.graphs)
            self.runner(size, *self.convention.bind(padded), warmup=True)
            graphs += self.runner.graphs[before:]
        return graphs

    def _empty_call(self, kv_cache, cos_sin: torch.Tensor) -> Call:
        """A call of no requests, which padding turns into an all-padding batch (what warm-up compiles)."""
        hidden = find_input(self.gm, HIDDEN_STATES).meta["val"]
        empty = MLAMetadata(slot_mapping=torch.empty(0, dtype=torch.int64),
                            block_table=torch.zeros(0, 1, dtype=torch.int32),
                            seq_lens=torch.empty(0, dtype=torch.int32),
                            query_start_loc=torch.zeros(1, dtype=torch.int32),
                            num_decodes=0, num_decode_tokens=0, num_prefills=0)
        return Call(torch.zeros(0, hidden.shape[1], dtype=hidden.dtype), torch.zeros(0, dtype=torch.int64),
                    kv_cache, empty, cos_sin)

    def __call__(self, call: Call, memo: StepMemo | None = None) -> torch.Tensor:
        count = call.metadata.num_reqs
        size = self.bucket_for(count)
        check_width(call.metadata.block_table, self.width)
        return self.runner(size, *self.convention.bind(self._padded(call, size), memo))[:count]


class BucketedMultiDecode(BucketedDecode):
    """Runs a multi_decode graph at a static (batch size, tokens per request) bucket: the smallest
    graph_batch_sizes entry that holds the requests and the smallest graph_decode_tokens entry that
    holds the longest one. Every request gets S = that many token rows, its own new tokens first;
    its padded draft positions come after them, at positions 0 (inside the rope table), writing the
    padding block, and its context length grows by as many, so that FIA's bottom-right causal mask
    (sparse_mode 3) still gives each real token exactly its own context; the padded rows see more and
    are dropped. Padded requests are S padding tokens over the padding block. The block table gets
    one more column of the padding block, where the padded positions of a request at the end of its
    table read."""

    def __init__(self, gm: GraphModule, options: TorchairOptions) -> None:
        super().__init__(gm, options)
        self.buckets: list[tuple[int, int]] = []   # (batch, tokens per request) of each call, as run

    def _shape(self, md: MLAMetadata) -> tuple[int, int, list[int]]:
        starts = md.query_start_loc.tolist()
        lens = [e - s for s, e in zip(starts, starts[1:])]
        size = self.bucket_for(md.num_reqs)
        tokens = self.options.tokens_bucket(max(lens, default=1))
        if tokens is None:
            raise ValueError(f"a decode request of {max(lens)} new tokens exceeds the largest graph_decode_tokens "
                             f"{self.options.graph_decode_tokens[-1]}; add a larger entry (at most "
                             f"{MAX_DECODE_TOKENS})")
        return size, tokens, lens

    def _spread(self, call: Call, size: int, tokens: int, lens: list[int]) -> tuple[Call, torch.Tensor]:
        """The call laid out as `size` requests of `tokens` rows; and the rows that hold its tokens."""
        md = call.metadata
        rows = torch.cat([b * tokens + torch.arange(n) for b, n in enumerate(lens)]) if lens else \
            torch.zeros(0, dtype=torch.int64)
        rows = rows.to(call.hidden_states.device)
        T = size * tokens
        hidden = call.hidden_states.new_zeros(T, call.hidden_states.shape[1]).index_copy_(0, rows, call.hidden_states)
        positions = call.positions.new_zeros(T).index_copy_(0, rows, call.positions)
        bs = self.block_size
        padding = PADDING_BLOCK * bs + torch.arange(T, dtype=torch.int64, device=rows.device) % bs
        given = md.slot_mapping.to(torch.int64)
        slots = padding.clone().index_copy_(0, rows, torch.where(given >= 0, given, padding[rows]))
        table = md.block_table.new_full((size, self.width + 1), PADDING_BLOCK)
        table[: md.num_reqs, : md.block_table.shape[1]] = md.block_table
        extra = torch.tensor([tokens - n for n in lens], dtype=md.seq_lens.dtype, device=md.seq_lens.device)
        seq_lens = md.seq_lens.new_full((size,), tokens)
        seq_lens[: md.num_reqs] = md.seq_lens + extra
        padded = MLAMetadata(slot_mapping=slots, block_table=table, seq_lens=seq_lens,
                             query_start_loc=torch.arange(size + 1, dtype=md.query_start_loc.dtype,
                                                          device=md.query_start_loc.device) * tokens,
                             num_decodes=size, num_decode_tokens=T, num_prefills=0)
        return Call(hidden, positions, call.kv_cache, padded, call.cos_sin), rows

    def warmup(self, kv_cache, cos_sin: torch.Tensor, sizes: tuple[int, ...] | None = None,
               tokens: tuple[int, ...] | None = None) -> list[GraphModule]:
        """Compile the graph of each (batch size, tokens per request) bucket with an all-padding batch."""
        empty = self._empty_call(kv_cache, cos_sin)
        graphs = []
        for size in sizes or self.options.graph_batch_sizes:
            for per_request in tokens or self.options.graph_decode_tokens:
                padded, _ = self._spread(empty, size, per_request, [])
                before = len(self.runner.graphs)
                self.runner(size, *self.convention.bind(padded), warmup=True)
                graphs += self.runner.graphs[before:]
        return graphs

    def __call__(self, call: Call, memo: StepMemo | None = None) -> torch.Tensor:
        size, tokens, lens = self._shape(call.metadata)
        check_width(call.metadata.block_table, self.width)
        padded, rows = self._spread(call, size, tokens, lens)
        self.buckets.append((size, tokens))
        return self.runner(size, *self.convention.bind(padded, memo))[rows]


def own_code(method: Callable, name: str) -> Callable:
    """`method` with a code object of its own, named `name`: Dynamo caches compiled graphs (and counts
    recompiles) per code object, so every runner gets its own cache and recompile budget
    (vllm-ascend's torchair runner cloned `forward.__code__` for the same reason)."""
    fn = method.__func__
    clone = types.FunctionType(fn.__code__.replace(co_name=name), fn.__globals__, fn.__name__,
                               fn.__defaults__, fn.__closure__)
    return types.MethodType(clone, method.__self__)


def recompile_limits(buckets: tuple[int, ...]) -> dict[str, int]:
    """Dynamo config for one graph per bucket, applied around a runner's own calls (config.patch),
    never process-wide."""
    limit = len(buckets) + 1
    return {"recompile_limit": max(torch._dynamo.config.recompile_limit, limit),
            "accumulated_recompile_limit": max(torch._dynamo.config.accumulated_recompile_limit, 8 * limit)}


def check_width(block_table: torch.Tensor, width: int) -> None:
    """A step's block table must fit the width a decode graph was compiled with."""
    if block_table.shape[1] > width:
        raise ValueError(f"block_table has {block_table.shape[1]} columns but the decode graph was built for "
                         f"max_blocks_per_req={width}; raise the torchair max_blocks_per_req option")


def _pad_rows(x: torch.Tensor, rows: int, value: int) -> torch.Tensor:
    pad = x.new_full((rows - x.shape[0], *x.shape[1:]), value)
    return torch.cat([x, pad])


def _pad_metadata(md: MLAMetadata, size: int, width: int, block_size: int) -> MLAMetadata:
    table = md.block_table.new_full((size, width), PADDING_BLOCK)
    table[: md.num_reqs, : md.block_table.shape[1]] = md.block_table
    # distinct rows of the padding block per padded token (wrapping past block_size)
    padding = PADDING_BLOCK * block_size + torch.arange(size, dtype=torch.int64) % block_size
    slots = _pad_rows(md.slot_mapping.to(torch.int64), size, -1)
    return MLAMetadata(
        slot_mapping=torch.where(slots >= 0, slots, padding),
        block_table=table,
        seq_lens=_pad_rows(md.seq_lens, size, 0),
        query_start_loc=torch.arange(size + 1, dtype=md.query_start_loc.dtype),
        num_decodes=size, num_decode_tokens=size, num_prefills=0,
    )

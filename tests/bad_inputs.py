"""The catalogue of bad inputs mla-graph rejects, run against every target; writes docs/bad-inputs.md.

    python tests/bad_inputs.py --write docs/bad-inputs.md

A *call* case corrupts one valid batch (hidden states, positions, cache, metadata) and calls the
layer on every target in checked mode, over caches filled with random data: the call must raise
one of our errors (never a bare IndexError/KeyError/RuntimeError from deep inside), and every cache
byte must be as it was. "accepted" cases are valid inputs at the edge (an empty batch): the output
must equal the plain definition's. A *builder* case calls a constructor or option parser with a
bad value. tests/test_bad_inputs.py runs all of them and checks the doc is what this script writes.
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from mla_graph import MLAAttention, MLAConfig, PagedLatentCache, lower  # noqa: E402
from mla_graph.cache import CacheFullError  # noqa: E402
from mla_graph.lowering import LoweringError  # noqa: E402
from mla_graph.metadata import MLAMetadata, build_metadata, positions_for  # noqa: E402

BLOCK = 16
BATCHES = {
    "mixed": [(1, 20), (1, 5), (6, 0), (3, 17)],   # decodes first, then prefills (one with a cached prefix)
    "decode": [(1, 20), (1, 5), (1, 33)],
}
TARGETS = ("plain", "reference", "cpu", "npu", "torchair")
# What a rejection may raise: ours, each with the field, the value and what is allowed.
OUR_ERRORS = (ValueError, TypeError, LoweringError, CacheFullError)


@dataclass
class Inputs:
    hidden_states: torch.Tensor
    positions: torch.Tensor
    cache: PagedLatentCache
    metadata: MLAMetadata

    @property
    def block_table(self) -> list[list[int]]:
        return self.metadata.block_table.tolist()


def tiny_config() -> MLAConfig:
    from mla_graph import YarnScaling
    return MLAConfig(hidden_size=64, num_heads=4, q_lora_rank=32, kv_lora_rank=48, qk_nope_head_dim=16,
                     qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=256,
                     rope_scaling=YarnScaling(factor=4, original_max_position_embeddings=64, beta_fast=32,
                                              beta_slow=1, mscale=1.0, mscale_all_dim=0.8),
                     name="bad-inputs")


def make_inputs(config: MLAConfig, batch: str, seed: int = 0) -> Inputs:
    """A valid batch over a cache of random bytes (so a stray write shows)."""
    gen = torch.Generator().manual_seed(seed)
    requests = BATCHES[batch]
    cache = PagedLatentCache.allocate(config, 12, BLOCK, shuffle_blocks=True, seed=seed)
    cache.latent.copy_(torch.randn(cache.latent.shape, generator=gen))
    cache.rope.copy_(torch.randn(cache.rope.shape, generator=gen))
    rows = [cache.allocator.grow([], n + c, BLOCK) for n, c in requests]
    metadata = build_metadata(requests, rows, BLOCK)
    hidden = torch.randn(sum(n for n, _ in requests), config.hidden_size, generator=gen)
    return Inputs(hidden, positions_for(requests), cache, metadata)


def copy_inputs(inputs: Inputs) -> Inputs:
    md = inputs.metadata
    metadata = dataclasses.replace(md, **{f: getattr(md, f).clone() for f in
                                          ("slot_mapping", "block_table", "seq_lens", "query_start_loc")})
    return Inputs(inputs.hidden_states.clone(), inputs.positions.clone(), inputs.cache.clone(), metadata)


def _set(tensor_name: str, index, value) -> Callable[[Inputs], None]:
    def apply(x: Inputs) -> None:
        owner = x if tensor_name == "positions" else x.metadata
        tensor = getattr(owner, tensor_name)
        tensor[index] = value
    return apply


def _replace_md(**fields) -> Callable[[Inputs], None]:
    def apply(x: Inputs) -> None:
        for name, make in fields.items():
            setattr(x.metadata, name, make(x))
    return apply


def _other_request_slot(x: Inputs) -> None:
    """Token 0's slot moved into a block of another request (in range, owned by someone else)."""
    other = x.block_table[1][0]
    x.metadata.slot_mapping[0] = other * BLOCK + 3


def _unowned_block_slot(x: Inputs) -> None:
    """Token 0's slot moved into a free block (in range, no request owns it)."""
    owned = {b for row in x.block_table for b in row}
    free = next(b for b in range(x.cache.num_blocks) if b not in owned and b != 0)
    x.metadata.slot_mapping[0] = free * BLOCK


def _duplicate_slot(x: Inputs) -> None:
    x.metadata.slot_mapping[1] = x.metadata.slot_mapping[0]


def _short_block_table(x: Inputs) -> None:
    """The block table cut to one block per request while contexts need up to three."""
    x.metadata.block_table = x.metadata.block_table[:, :1].contiguous()


def _swap_decode_and_prefill(x: Inputs) -> None:
    """query_start_loc says the last request is a decode, after prefills (vLLM orders decodes first)."""
    qsl = x.metadata.query_start_loc
    T = x.hidden_states.shape[0]
    qsl[-2] = T - 1


def _extra_empty_request(x: Inputs) -> None:
    md = x.metadata
    md.seq_lens = torch.cat([md.seq_lens, md.seq_lens[-1:]])
    md.query_start_loc = torch.cat([md.query_start_loc, md.query_start_loc[-1:]])
    md.block_table = torch.cat([md.block_table, md.block_table[-1:]])
    md.num_prefills += 1


def _empty_batch(x: Inputs) -> None:
    config_width = x.hidden_states.shape[1]
    x.hidden_states = x.hidden_states.new_zeros(0, config_width)
    x.positions = x.positions[:0]
    md = x.metadata
    md.slot_mapping, md.seq_lens = md.slot_mapping[:0], md.seq_lens[:0]
    md.block_table, md.query_start_loc = md.block_table[:0], md.query_start_loc[:1]
    md.num_decodes = md.num_decode_tokens = md.num_prefills = 0


def _requests_without_tokens(x: Inputs) -> None:
    x.hidden_states = x.hidden_states[:0]
    x.positions = x.positions[:0]
    x.metadata.slot_mapping = x.metadata.slot_mapping[:0]


def _cache_as_tuple(x: Inputs) -> None:
    x.cache = (x.cache.latent, x.cache.rope)


def _metadata_as_dict(x: Inputs) -> None:
    x.metadata = dataclasses.asdict(x.metadata)


def _cache_dtype(x: Inputs) -> None:
    x.cache = PagedLatentCache(x.cache.latent.double(), x.cache.rope.double())


def _cache_latent_width(x: Inputs) -> None:
    x.cache = PagedLatentCache(x.cache.latent[..., :-1], x.cache.rope)


def _cache_blocks_disagree(x: Inputs) -> None:
    x.cache = PagedLatentCache(x.cache.latent, x.cache.rope[:-1])


def _cache_block_size(x: Inputs) -> None:
    """The same bytes seen as blocks of 8: every slot now means another row."""
    c = x.cache
    x.cache = PagedLatentCache(c.latent.reshape(-1, 8, 1, c.latent.shape[-1]),
                               c.rope.reshape(-1, 8, 1, c.rope.shape[-1]))


def _slot_dtype_float(x: Inputs) -> None:
    x.metadata.slot_mapping = x.metadata.slot_mapping.float()


def _positions_float(x: Inputs) -> None:
    x.positions = x.positions.float()


def _hidden_width(x: Inputs) -> None:
    x.hidden_states = x.hidden_states[:, :-1]


def _hidden_dtype(x: Inputs) -> None:
    x.hidden_states = x.hidden_states.double()


def _positions_short(x: Inputs) -> None:
    x.positions = x.positions[:-1]


def _slots_short(x: Inputs) -> None:
    x.metadata.slot_mapping = x.metadata.slot_mapping[:-1]


def _block_table_1d(x: Inputs) -> None:
    x.metadata.block_table = x.metadata.block_table[0]


def _block_table_rows(x: Inputs) -> None:
    x.metadata.block_table = x.metadata.block_table[:-1]


def _qsl_length(x: Inputs) -> None:
    x.metadata.query_start_loc = x.metadata.query_start_loc[:-1]


def _seq_lens_2d(x: Inputs) -> None:
    x.metadata.seq_lens = x.metadata.seq_lens[:, None]


def _last(x: Inputs) -> int:
    return x.hidden_states.shape[0] - 1


@dataclass
class CallCase:
    name: str
    what: str
    apply: Callable[[Inputs], None]
    # the targets that must reject it; the others must accept it and equal the plain definition
    rejected_by: tuple[str, ...] = TARGETS
    batches: tuple[str, ...] = ("mixed", "decode")


@dataclass
class BuilderCase:
    name: str
    what: str
    call: Callable[[], Any]


CALL_CASES: list[CallCase] = [
    # -- values (checked mode) --
    CallCase("negative position", "positions[0] = -1 (would wrap around the rope table)", _set("positions", 0, -1)),
    CallCase("position past the rope table", "positions[0] = max_position_embeddings", _set("positions", 0, 256)),
    CallCase("position off by one", "positions[0] += 1 (not the token's place in its request)",
             lambda x: x.positions.__setitem__(0, int(x.positions[0]) + 1)),
    CallCase("slot -5", "slot_mapping[0] = -5 (only -1 means 'write nothing')", _set("slot_mapping", 0, -5)),
    CallCase("slot past the cache", "slot_mapping[0] = num_blocks * block_size", _set("slot_mapping", 0, 12 * BLOCK)),
    CallCase("slot in another request's block", "slot_mapping[0] inside request 1's first block", _other_request_slot),
    CallCase("slot in an unowned block", "slot_mapping[0] inside a block no request owns", _unowned_block_slot),
    CallCase("two tokens, one slot", "slot_mapping[1] = slot_mapping[0]", _duplicate_slot),
    CallCase("block id -1", "block_table[0][0] = -1 (slots -16..-1)", _set("block_table", (0, 0), -1)),
    CallCase("block id past the cache", "block_table[0][0] = num_blocks", _set("block_table", (0, 0), 12)),
    CallCase("padding block in a context", "block_table[0][0] = 0, the block graph-mode decode pads into "
             "(rejected where a graph-mode runner runs the batch: torchair decode)", _set("block_table", (0, 0), 0),
             rejected_by=("torchair",), batches=("decode",)),
    CallCase("block table shorter than the context", "block_table cut to one block per request", _short_block_table),
    CallCase("seq_len below the new tokens", "seq_lens[-1] = 1 for a request with several new tokens",
             _set("seq_lens", -1, 1), batches=("mixed",)),
    CallCase("negative seq_len", "seq_lens[0] = -3", _set("seq_lens", 0, -3)),
    CallCase("seq_len past the rope table", "seq_lens[0] = max_position_embeddings + 1",
             _set("seq_lens", 0, 257)),
    CallCase("query_start_loc not from 0", "query_start_loc[0] = 1", _set("query_start_loc", 0, 1)),
    CallCase("decreasing query_start_loc", "query_start_loc[1] = query_start_loc[2] + 1",
             lambda x: x.metadata.query_start_loc.__setitem__(1, int(x.metadata.query_start_loc[2]) + 1)),
    CallCase("query_start_loc ends early", "query_start_loc[-1] = num_tokens - 1",
             lambda x: x.metadata.query_start_loc.__setitem__(-1, _last(x))),
    CallCase("decode after a prefill", "the last request has one new token, after prefills",
             _swap_decode_and_prefill, batches=("mixed",)),
    CallCase("request with no new tokens", "an extra request whose query_start_loc range is empty",
             _extra_empty_request),
    # -- structure (always) --
    CallCase("num_decodes too large", "num_decodes + 1 (num_prefills unchanged)",
             _replace_md(num_decodes=lambda x: x.metadata.num_decodes + 1)),
    CallCase("counts moved between phases", "num_decodes + 1 and num_prefills - 1 (sums still match)",
             _replace_md(num_decodes=lambda x: x.metadata.num_decodes + 1,
                         num_decode_tokens=lambda x: x.metadata.num_decode_tokens + 1,
                         num_prefills=lambda x: x.metadata.num_prefills - 1), batches=("mixed",)),
    CallCase("num_decode_tokens off by one", "num_decode_tokens + 1 (not the decodes' new tokens)",
             _replace_md(num_decode_tokens=lambda x: x.metadata.num_decode_tokens + 1)),
    CallCase("negative num_prefills", "num_prefills = -1", _replace_md(num_prefills=lambda x: -1)),
    CallCase("hidden_states width", "hidden_states [T, hidden - 1]", _hidden_width),
    CallCase("hidden_states dtype", "hidden_states float64 for a float32 layer", _hidden_dtype),
    CallCase("positions length", "positions [T - 1]", _positions_short),
    CallCase("float positions", "positions float32", _positions_float),
    CallCase("slot_mapping length", "slot_mapping [T - 1]", _slots_short),
    CallCase("float slot_mapping", "slot_mapping float32", _slot_dtype_float),
    CallCase("1-D block_table", "block_table [max_blocks]", _block_table_1d),
    CallCase("block_table rows", "block_table [num_reqs - 1, max_blocks]", _block_table_rows),
    CallCase("query_start_loc length", "query_start_loc [num_reqs]", _qsl_length),
    CallCase("2-D seq_lens", "seq_lens [num_reqs, 1]", _seq_lens_2d),
    CallCase("tokens but no requests", "T = 0 tokens with num_reqs > 0", _requests_without_tokens),
    CallCase("cache as a tuple", "kv_cache = (latent, rope)", _cache_as_tuple),
    CallCase("metadata as a dict", "metadata = dataclasses.asdict(metadata)", _metadata_as_dict),
    CallCase("cache dtype", "kv_cache float64 for a float32 layer", _cache_dtype),
    CallCase("cache latent width", "kv_cache.latent [..., kv_lora_rank - 1]", _cache_latent_width),
    CallCase("cache latent/rope disagree", "kv_cache.rope has one block fewer than kv_cache.latent",
             _cache_blocks_disagree),
    CallCase("cache block size", "the cache's bytes seen as blocks of 8 (lowered for 16)", _cache_block_size),
    # -- valid edges --
    CallCase("empty batch", "no tokens, no requests", _empty_batch, rejected_by=()),
]


def _from_hf(**rope) -> Callable[[], Any]:
    base = dict(hidden_size=64, num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
                qk_rope_head_dim=8, v_head_dim=16)
    return lambda: MLAConfig.from_hf(dict(base, **rope))


def _lower(**kwargs) -> Callable[[], Any]:
    def call():
        layer = MLAAttention(tiny_config())
        return lower(layer, **{"phases": ["decode"], **kwargs})
    return call


def _torchair_option(**options) -> Callable[[], Any]:
    return _lower(target="torchair", target_options=options)


def _checked_env(value: str) -> Callable[[], Any]:
    def call():
        import os
        from mla_graph.attention import CHECKED_ENV, checked_mode
        old = os.environ.get(CHECKED_ENV)
        os.environ[CHECKED_ENV] = value
        try:
            return checked_mode()
        finally:
            if old is None:
                del os.environ[CHECKED_ENV]
            else:
                os.environ[CHECKED_ENV] = old
    return call


BUILDER_CASES: list[BuilderCase] = [
    BuilderCase("from_hf: yarn without factor", "rope_scaling {'type': 'yarn'}", _from_hf(rope_scaling={"type": "yarn"})),
    BuilderCase("from_hf: rope_scaling as a list", "rope_scaling [40, 4096]", _from_hf(rope_scaling=[40, 4096])),
    BuilderCase("from_hf: factor not a number", "rope_scaling factor 'forty'",
                _from_hf(rope_scaling={"type": "yarn", "factor": "forty"})),
    BuilderCase("from_hf: unknown rope type", "rope_scaling type 'dynamic'",
                _from_hf(rope_scaling={"type": "dynamic", "factor": 2})),
    BuilderCase("from_hf: not an MLA config", "a Llama config (no kv_lora_rank)",
                lambda: MLAConfig.from_hf({"hidden_size": 64, "num_attention_heads": 4})),
    BuilderCase("MLAConfig: odd rope dim", "qk_rope_head_dim = 7", lambda: tiny_config().replace(qk_rope_head_dim=7)),
    BuilderCase("MLAConfig: tp_size not dividing heads", "heads_per_rank(3) with 4 heads",
                lambda: tiny_config().heads_per_rank(3)),
    BuilderCase("allocate: num_blocks -1", "PagedLatentCache.allocate(num_blocks=-1)",
                lambda: PagedLatentCache.allocate(tiny_config(), -1, BLOCK)),
    BuilderCase("allocate: block_size 0", "PagedLatentCache.allocate(block_size=0)",
                lambda: PagedLatentCache.allocate(tiny_config(), 4, 0)),
    BuilderCase("allocate: integer dtype", "PagedLatentCache.allocate(dtype=torch.int8)",
                lambda: PagedLatentCache.allocate(tiny_config(), 4, BLOCK, dtype=torch.int8)),
    BuilderCase("allocator: too many blocks", "allocate(20) from 4 blocks",
                lambda: PagedLatentCache.allocate(tiny_config(), 4, BLOCK).allocator.allocate(20)),
    BuilderCase("build_metadata: block id -1", "block table [[-1]]",
                lambda: build_metadata([(1, 3)], [[-1]], BLOCK)),
    BuilderCase("build_metadata: negative cached count", "request (1, -2)",
                lambda: build_metadata([(1, -2)], [[1]], BLOCK)),
    BuilderCase("build_metadata: context longer than its blocks", "request (1, 40) with one block of 16",
                lambda: build_metadata([(1, 40)], [[1]], BLOCK)),
    BuilderCase("build_metadata: decode after prefill", "requests [(4, 0), (1, 3)]",
                lambda: build_metadata([(4, 0), (1, 3)], [[1], [2]], BLOCK)),
    BuilderCase("positions_for: negative cached count", "request (1, -2)", lambda: positions_for([(1, -2)])),
    BuilderCase("lower: unknown target", "target 'gpu'", _lower(target="gpu")),
    BuilderCase("lower: unknown phase", "phases ['verify']", _lower(phases=["verify"])),
    BuilderCase("lower: block_size 0", "block_size 0", _lower(block_size=0)),
    BuilderCase("lower: checked 'yes'", "checked='yes'", _lower(checked="yes")),
    BuilderCase("lower: option for another target", "target 'npu' with graph_batch_sizes",
                _lower(target="npu", target_options={"graph_batch_sizes": [1]})),
    BuilderCase("torchair: max_blocks_per_req 0", "max_blocks_per_req=0", _torchair_option(max_blocks_per_req=0)),
    BuilderCase("torchair: max_blocks_per_req -1", "max_blocks_per_req=-1", _torchair_option(max_blocks_per_req=-1)),
    BuilderCase("torchair: frozen_parameter 'no'", "frozen_parameter='no'", _torchair_option(frozen_parameter="no")),
    BuilderCase("torchair: graph_batch_sizes with a string", "graph_batch_sizes=[1, 'a']",
                _torchair_option(graph_batch_sizes=[1, "a"])),
    BuilderCase("torchair: graph_batch_sizes an int", "graph_batch_sizes=4", _torchair_option(graph_batch_sizes=4)),
    BuilderCase("torchair: empty graph_batch_sizes", "graph_batch_sizes=[]", _torchair_option(graph_batch_sizes=[])),
    BuilderCase("torchair: mode reduce-overhead", "mode='reduce-overhead'", _torchair_option(mode="reduce-overhead")),
    BuilderCase("MLA_GRAPH_CHECKED=maybe", "the environment variable set to 'maybe'", _checked_env("maybe")),
]


# ---- running -------------------------------------------------------------------------------

class Runner:
    """One plain layer and its lowered modules, all in checked mode."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.config = tiny_config()
        self.layer = MLAAttention(self.config)
        with torch.no_grad():
            for p in self.layer.parameters():
                p.copy_(torch.randn(p.shape) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
        self.layer.requires_grad_(False)
        self.layer.checked = True
        self.modules: dict[str, Any] = {"plain": self.layer}
        for target in TARGETS[1:]:
            options = {"graph_batch_sizes": [4]} if target == "torchair" else None
            self.modules[target] = lower(self.layer, target, block_size=BLOCK, checked=True,
                                         target_options=options)

    def call(self, target: str, x: Inputs, *, checked: bool = True):
        module = self.modules[target]
        old = module.checked
        module.checked = checked
        try:
            with torch.no_grad():
                return module(x.hidden_states, x.positions, x.cache, x.metadata)
        finally:
            module.checked = old


@dataclass
class Outcome:
    rejected: bool
    error: str                    # "ErrorType: first line", or "" when accepted
    our_error: bool               # raised one of OUR_ERRORS
    cache_unchanged: bool
    matches_plain: bool | None    # accepted calls: output and cache equal the plain definition's


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def cache_bytes(cache) -> tuple[torch.Tensor, torch.Tensor] | None:
    if isinstance(cache, PagedLatentCache):
        return cache.latent.clone(), cache.rope.clone()
    return None


def run_call(runner: Runner, target: str, case_apply: Callable[[Inputs], None], batch: str,
             *, checked: bool = True, base: Inputs | None = None) -> Outcome:
    x = copy_inputs(base or make_inputs(runner.config, batch))
    case_apply(x)
    before = cache_bytes(x.cache)
    try:
        out = runner.call(target, x, checked=checked)
    except Exception as exc:  # noqa: BLE001 - classified below
        after = cache_bytes(x.cache)
        unchanged = before is None or all(same_bytes(a, b) for a, b in zip(before, after))
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return Outcome(True, message, isinstance(exc, OUR_ERRORS), unchanged, None)
    if target == "plain":
        return Outcome(False, "", True, True, True)   # the definition agrees with itself
    # accepted: the plain definition on the same inputs must agree (and accept them too)
    y = copy_inputs(base or make_inputs(runner.config, batch))
    case_apply(y)
    try:
        want = runner.call("plain", y, checked=checked)
    except Exception:  # noqa: BLE001
        return Outcome(False, "", True, True, False)
    same_out = out.shape == want.shape and torch.allclose(out, want, rtol=1e-4, atol=1e-4)
    same_cache = (not isinstance(x.cache, PagedLatentCache)
                  or (torch.allclose(x.cache.latent[1:], y.cache.latent[1:], rtol=1e-4, atol=1e-4)
                      and torch.allclose(x.cache.rope[1:], y.cache.rope[1:], rtol=1e-4, atol=1e-4)))
    return Outcome(False, "", True, True, bool(same_out and same_cache))


def run_builder(case: BuilderCase) -> Outcome:
    try:
        case.call()
    except Exception as exc:  # noqa: BLE001
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return Outcome(True, message, isinstance(exc, OUR_ERRORS), True, None)
    return Outcome(False, "", True, True, None)


def table(runner: Runner | None = None) -> str:
    """The Markdown document: every case, per target, with its message."""
    runner = runner or Runner()
    lines = [
        "# Bad inputs mla-graph rejects",
        "",
        "Generated by `python tests/bad_inputs.py --write docs/bad-inputs.md` (tests/test_bad_inputs.py",
        "checks that this file is what the script writes, and that every rejected call left every cache",
        "byte as it was). Call cases corrupt one valid batch (a mixed batch of 2 decodes and 2 prefills,",
        "block size 16, over a cache of random bytes; a decode batch where the mixed one does not apply)",
        "and run it on every target in checked mode;",
        "`always` marks the checks that also run outside checked mode (shapes, dtypes, counts: no device",
        "sync); `checked` the ones that read tensor values, which run only in checked mode",
        "(`lower(..., checked=True)`, `MLAAttention.checked = True`, `MLA_GRAPH_CHECKED=1`, the CLI's",
        "`--verify`). Outside checked mode a bad value may give a wrong answer or a half-written cache.",
        "",
        f"{len(CALL_CASES)} call inputs x {len(TARGETS)} targets, and {len(BUILDER_CASES)} builder inputs.",
        "",
        "## Calls (" + ", ".join(TARGETS) + ")",
        "",
        "| # | input | what is wrong | when | result on " + " / ".join(TARGETS) + " | message |",
        "|---|---|---|---|---|---|",
    ]
    for i, case in enumerate(CALL_CASES, 1):
        batch = case.batches[0]
        outcomes = {t: run_call(runner, t, case.apply, batch) for t in TARGETS}
        probe = case.rejected_by[0] if case.rejected_by else "reference"
        unchecked = run_call(runner, probe, case.apply, batch, checked=False)
        when = "—" if not case.rejected_by else ("always" if unchecked.rejected and unchecked.our_error else "checked")
        results = " / ".join(("rejected" if o.rejected else ("accepted, = plain" if o.matches_plain else "WRONG"))
                             for o in outcomes.values())
        messages = list(dict.fromkeys(o.error for o in outcomes.values() if o.error))
        if len(messages) == 1:
            message = messages[0]
        else:
            message = "<br>".join(f"{t}: {o.error}" for t, o in outcomes.items() if o.error) or "—"
        lines.append(f"| {i} | {case.name} | {case.what} | {when} | {results} | {_md(message)} |")
    lines += ["", "## Builders and options", "", "| # | input | what is wrong | message |", "|---|---|---|---|"]
    for i, case in enumerate(BUILDER_CASES, len(CALL_CASES) + 1):
        outcome = run_builder(case)
        lines.append(f"| {i} | {case.name} | {case.what} | {_md(outcome.error or 'ACCEPTED')} |")
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="FILE", help="write the Markdown table here (default: print it)")
    args = parser.parse_args()
    text = table()
    if args.write:
        pathlib.Path(args.write).write_text(text)
        print(f"wrote {args.write}")
    else:
        print(text)


if __name__ == "__main__":
    main()

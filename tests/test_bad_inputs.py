"""Bad inputs on every target, in checked mode: rejected with our error, nothing written.

The catalogue is tests/bad_inputs.py; docs/bad-inputs.md is what it writes. A fuzz test corrupts
valid metadata at random (out of range, negative, off by one, shuffled, swapped): every corruption
is rejected with every cache byte as it was, or harmless (the plain definition accepts it too and
gives the same output and cache).
"""
from __future__ import annotations

import pathlib
import random

import pytest
import torch

from bad_inputs import (BATCHES, BUILDER_CASES, CALL_CASES, TARGETS, Inputs, Runner, make_inputs, run_builder,
                        run_call, table)

DOC = pathlib.Path(__file__).parent.parent / "docs" / "bad-inputs.md"


@pytest.fixture(scope="module")
def runner() -> Runner:
    return Runner()


@pytest.fixture(scope="module")
def bases(runner) -> dict[str, Inputs]:
    return {batch: make_inputs(runner.config, batch) for batch in BATCHES}


def test_catalogue_size():
    names = [c.name for c in CALL_CASES] + [c.name for c in BUILDER_CASES]
    assert len(set(names)) == len(names), "duplicate case names"
    assert len(names) >= 40


def test_valid_batches_agree(runner, bases):
    """The uncorrupted batches run on every target and equal the plain definition: the
    corruptions below start from inputs every target accepts."""
    for batch, base in bases.items():
        for target in TARGETS[1:]:
            outcome = run_call(runner, target, lambda x: None, batch, base=base)
            assert not outcome.rejected, f"{target}, {batch}: valid batch rejected: {outcome.error}"
            assert outcome.matches_plain, f"{target}, {batch}: differs from the plain definition"


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", CALL_CASES, ids=[c.name for c in CALL_CASES])
def test_call_case(case, target, runner, bases):
    for batch in case.batches:
        outcome = run_call(runner, target, case.apply, batch, base=bases[batch])
        if target not in case.rejected_by:
            assert not outcome.rejected, f"{batch}: a valid input was rejected: {outcome.error}"
            assert outcome.matches_plain, f"{batch}: accepted but differs from the plain definition"
            continue
        assert outcome.rejected, f"{batch}: {case.what}: accepted without an error"
        assert outcome.our_error, f"{batch}: rejected with a raw error: {outcome.error}"
        assert outcome.cache_unchanged, f"{batch}: the rejected call changed the cache ({outcome.error})"


@pytest.mark.parametrize("case", BUILDER_CASES, ids=[c.name for c in BUILDER_CASES])
def test_builder_case(case):
    outcome = run_builder(case)
    assert outcome.rejected, f"{case.what}: accepted"
    assert outcome.our_error, f"{case.what}: raw error {outcome.error}"


def test_unchecked_mode_skips_value_checks(runner, bases):
    """Outside checked mode the value checks do not run (what the doc's 'when' column says):
    a slot of -5 is not rejected by the reference target's checks (the kernel may still fail)."""
    case = next(c for c in CALL_CASES if c.name == "position off by one")
    outcome = run_call(runner, "reference", case.apply, "mixed", base=bases["mixed"], checked=False)
    assert not outcome.rejected, outcome.error


def test_doc_is_generated(runner):
    expected = table(runner)
    assert DOC.exists(), f"{DOC} missing; write it with: python tests/bad_inputs.py --write docs/bad-inputs.md"
    assert DOC.read_text() == expected, ("docs/bad-inputs.md is stale; regenerate it with: "
                                         "python tests/bad_inputs.py --write docs/bad-inputs.md")
    assert "WRONG" not in expected and "ACCEPTED" not in expected


# ---- fuzz --------------------------------------------------------------------------------

TRIALS = 150
FIELDS = ("slot_mapping", "block_table", "seq_lens", "query_start_loc", "positions")


def corrupt(x: Inputs, rng: random.Random) -> str:
    """One random corruption of one field, in place; returns what was done."""
    field = rng.choice(FIELDS)
    owner = x if field == "positions" else x.metadata
    tensor = getattr(owner, field)
    flat = tensor.view(-1)
    n = flat.numel()
    op = rng.choice(["set", "set", "set", "shuffle", "swap", "nudge"])
    if op == "shuffle" and n > 1:
        setattr(owner, field, flat[torch.randperm(n, generator=torch.Generator().manual_seed(rng.randrange(1 << 30)))]
                .view(tensor.shape).clone())
        return f"{field}: shuffled"
    i = rng.randrange(n)
    if op == "swap" and n > 1:
        j = rng.randrange(n)
        a, b = int(flat[i]), int(flat[j])
        flat[i], flat[j] = b, a
        return f"{field}: swapped [{i}] and [{j}]"
    if op == "nudge":
        delta = rng.choice([-1, 1])
        flat[i] += delta
        return f"{field}[{i}] {delta:+d}"
    value = rng.choice([-1, -2, -17, 0, 1, rng.randrange(1000), 1 << 20, int(flat[i]) + 16, int(flat[i]) - 16])
    flat[i] = value
    return f"{field}[{i}] = {value}"


@pytest.mark.parametrize("target", TARGETS[1:])
def test_fuzzed_metadata(target, runner, bases):
    rng = random.Random(f"fuzz-{target}")
    rejected = accepted = 0
    for trial in range(TRIALS):
        batch = rng.choice(list(BATCHES))
        seed = rng.randrange(1 << 30)
        done = []

        def apply(x: Inputs, seed=seed, done=done) -> None:
            done.clear()
            local = random.Random(seed)
            for _ in range(local.choice([1, 1, 2])):
                done.append(corrupt(x, local))

        outcome = run_call(runner, target, apply, batch, base=bases[batch])
        what = f"trial {trial}, {batch}: {'; '.join(done)}"
        if outcome.rejected:
            rejected += 1
            assert outcome.our_error, f"{what}: raw error {outcome.error}"
            assert outcome.cache_unchanged, f"{what}: rejected ({outcome.error}) after changing the cache"
        else:
            accepted += 1
            assert outcome.matches_plain, f"{what}: accepted, but the output or cache differs from the plain definition"
    print(f"{target}: {rejected} corruptions rejected, {accepted} harmless (equal to the plain definition)")
    assert rejected >= TRIALS // 2, f"only {rejected} of {TRIALS} corruptions rejected: the fuzzer is not corrupting"

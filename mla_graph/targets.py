"""Targets: which passes run for which target, as data.

Each pipeline is a flat list, one line per pass, with why it sits where it does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from passes import eliminate_dead_code, remove_noop_views
from passes.base import GraphPass


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    pipeline: Callable[[str], Sequence[GraphPass]]
    prepare: Callable[[], object] = field(default=lambda: None)


def _reference_pipeline(phase: str) -> list[GraphPass]:
    return [
        remove_noop_views,     # capture leaves reshapes to the shape a tensor already has
        eliminate_dead_code,   # last: earlier rewrites orphan the nodes they replaced
    ]


TARGETS: dict[str, Target] = {
    "reference": Target("reference", "mla:: primitives run as plain PyTorch (the golden)",
                        _reference_pipeline),
}

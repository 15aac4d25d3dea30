"""Argument errors shared by the emulated kernels.

Every rejection names the op, the argument, the value it got and what the real
kernel accepts, so a failing graph points at the offending call site.
"""
from __future__ import annotations

from typing import NoReturn


def reject(op: str, arg: str, value: object, expected: str) -> NoReturn:
    raise ValueError(f"{op}: {arg}={value!r} is not supported; expected {expected}")


def require(ok: bool, op: str, arg: str, value: object, expected: str) -> None:
    if not ok:
        reject(op, arg, value, expected)


def reject_given(op: str, **optional: object) -> None:
    """Reject optional inputs the emulation does not model (quantisation and the like)."""
    for arg, value in optional.items():
        if value is not None:
            shown = tuple(value.shape) if hasattr(value, "shape") else value
            reject(op, arg, shown, "None (this input is not emulated on CPU)")

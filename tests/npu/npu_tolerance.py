"""Tolerances from the output dtype's resolution, for kernels compared with a float32 oracle
computed from the same (already rounded) inputs.

The kernel computes in float32 and rounds once to its output dtype, so each element is within
one ulp of the oracle (half an ulp of rounding, plus float32 differences that can move it
across a rounding boundary): rtol = ulps * eps. Elements near zero have a finer grid than the
float32 error of sums over the row, which scales with the output's magnitude: atol = ulps ulps
of the largest |expected|.
"""
import torch
from conftest import ulp


def assert_ulps_close(actual: torch.Tensor, expected: torch.Tensor, ulps: float = 2) -> None:
    eps = torch.finfo(actual.dtype).eps
    finite = expected[torch.isfinite(expected)]
    scale = finite.abs().max().item() if finite.numel() else 1.0
    torch.testing.assert_close(actual.float(), expected.float(), rtol=ulps * eps, atol=ulps * eps * scale)


def assert_rounded_once(actual: torch.Tensor, expected: torch.Tensor, terms: int) -> None:
    """For a kernel that computes in float32 and rounds its result once to actual.dtype, checked
    against a float32 oracle over the same inputs: each element is within half an ulp of
    actual.dtype (the rounding) plus the float32 error of the oracle's and the kernel's sums, at
    most `terms` (the longest chain of reductions) float32 eps of the largest |expected|.

    For bfloat16 that is about 0.2-0.4% of an element: a 1% error fails wherever the element is
    not tiny next to the largest one."""
    e = expected.double()
    noise = terms * torch.finfo(torch.float32).eps * float(e.abs().max())
    spacing = ulp(e.abs() + noise, actual.dtype).double()
    diff = (actual.double() - e).abs()
    tol = 0.5 * spacing + noise
    worst = int((diff - tol).argmax())
    assert (diff <= tol).all(), (
        f"{int((diff > tol).sum())} of {diff.numel()} elements are more than half a {actual.dtype} ulp + "
        f"{noise:.3g} from the float32 oracle; worst at flat index {worst}: {float(actual.flatten()[worst])} vs "
        f"{float(e.flatten()[worst])} (off by {float(diff.flatten()[worst] / e.flatten()[worst].abs()):.2%})")

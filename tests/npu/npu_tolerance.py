"""Tolerances from the output dtype's resolution, for kernels compared with a float32 oracle
computed from the same (already rounded) inputs.

The kernel computes in float32 and rounds once to its output dtype, so each element is within
one ulp of the oracle (half an ulp of rounding, plus float32 differences that can move it
across a rounding boundary): rtol = ulps * eps. Elements near zero have a finer grid than the
float32 error of sums over the row, which scales with the output's magnitude: atol = ulps ulps
of the largest |expected|.
"""
import torch


def assert_ulps_close(actual: torch.Tensor, expected: torch.Tensor, ulps: float = 2) -> None:
    eps = torch.finfo(actual.dtype).eps
    finite = expected[torch.isfinite(expected)]
    scale = finite.abs().max().item() if finite.numel() else 1.0
    torch.testing.assert_close(actual.float(), expected.float(), rtol=ulps * eps, atol=ulps * eps * scale)

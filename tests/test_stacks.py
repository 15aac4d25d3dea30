"""The supported stacks (mla_graph.stacks) and what pyproject.toml promises agree.

Installing mla-graph beside a supported torch must never move it: the torch requirement admits
exactly the supported release lines (2.10.0 as vllm-ascend pins it, 2.13.0 as vLLM 0.30 pins it,
with their local builds) and nothing that no test covers. The torch-npu extras name the release
of each line, the one whose wheel judges the graphs on that line.
"""
import pathlib
import tomllib

import pytest
import torch
from packaging.requirements import Requirement

from mla_graph.stacks import STACKS, UnsupportedStack, current, release_line, stack_for

PYPROJECT = tomllib.loads((pathlib.Path(__file__).parent.parent / "pyproject.toml").read_text())


def torch_requirement() -> Requirement:
    (req,) = [Requirement(r) for r in PYPROJECT["project"]["dependencies"] if Requirement(r).name == "torch"]
    return req


@pytest.mark.parametrize("version, admitted", [
    ("2.10.0", True), ("2.10.0+cpu", True), ("2.10.0+cu128", True), ("2.13.0", True), ("2.13.0+cpu", True),
    ("2.9.1", False), ("2.11.0", False), ("2.12.1", False), ("2.13.1", False), ("2.14.1", False), ("2.15.0", False),
])
def test_the_torch_range_is_the_supported_lines(version, admitted):
    assert torch_requirement().specifier.contains(version, prereleases=False) is admitted
    if admitted:
        assert stack_for(version).torch == release_line(version)
    elif release_line(version) not in {s.torch for s in STACKS}:   # 2.13.1 is the 2.13 line, untested
        with pytest.raises(UnsupportedStack, match=r"supports torch 2\.10\.x, 2\.13\.x"):
            stack_for(version)


def test_the_npu_extras_name_each_lines_torch_npu():
    extras = PYPROJECT["project"]["optional-dependencies"]
    for stack in STACKS:
        (req,) = [Requirement(r) for r in extras[f"npu-{stack.torch.replace('.', '-')}"]]
        assert req.name == "torch-npu" and str(req.specifier) == f"=={stack.torch_npu}"


def test_the_running_torch_is_a_supported_stack():
    stack = current()
    assert torch_requirement().specifier.contains(torch.__version__)
    assert torch.__version__.startswith(stack.torch + ".")


def test_a_torch_npu_wheel_of_another_torch_line_is_refused(tmp_path):
    """Loaded beside another torch, a wheel's torchair would drop converters silently (its converter
    package skips a file at its first missing aten overload): the toolchain refuses it, naming the
    wheel's torch and the release to use."""
    import zipfile

    from mla_graph.ascend_toolchain.toolchain import _locate
    from mla_graph.ascend_toolchain.wheel import ToolchainUnavailable, required_torch, wheel_release

    other = next(s for s in STACKS if s is not current())
    wheel = tmp_path / f"torch_npu-{other.torch_npu}-cp311-cp311-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"torch_npu-{other.torch_npu}.dist-info/METADATA",
                         f"Name: torch_npu\nVersion: {other.torch_npu}\nRequires-Dist: torch =={other.torch}.0+cpu\n")
    assert wheel_release(wheel) == other.torch_npu and required_torch(wheel) == f"{other.torch}.0+cpu"
    with pytest.raises(ToolchainUnavailable, match=f"torch-npu {other.torch_npu}, built for torch {other.torch}.0\\+cpu, "
                                                   f"but this is torch .*Use the torch-npu {current().torch_npu} wheel"):
        _locate(wheel)

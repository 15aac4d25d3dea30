"""Importing mla_graph.npu registers nothing; ensure_npu_ops is idempotent."""
import pathlib
import subprocess
import sys

SCRIPT = """
import torch
import mla_graph.npu as npu_pkg
assert not hasattr(torch.ops.npu, "npu_rms_norm"), "registered at import"
first, second = npu_pkg.ensure_npu_ops(), npu_pkg.ensure_npu_ops()
assert first == second == npu_pkg.npu_backend() == "emulated", (first, second)
assert torch.ops.atb.npu_ring_mla.default is not None
"""


def test_import_registers_nothing_and_ensure_is_idempotent():
    repo_root = pathlib.Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=repo_root)
    assert done.returncode == 0, done.stderr

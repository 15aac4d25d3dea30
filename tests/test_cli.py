"""The mla-graph command line, end to end."""
import json
import subprocess
import sys

import pytest
from conftest import V3_TINY

from mla_graph.cli import main


@pytest.fixture
def tiny_hf_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(V3_TINY.to_hf()))
    return path


def test_lower_prints_pipeline_writes_dumps_and_verifies(tiny_hf_config, tmp_path, capsys):
    dump = tmp_path / "dumps"
    code = main(["lower", "--hf-config", str(tiny_hf_config), "--dtype", "fp32", "--block-size", "16",
                 "--phase", "decode", "--phase", "mixed", "--dump", str(dump), "--verify"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "[reference / decode]" in out and "[reference / mixed]" in out and "eliminate_dead_code" in out
    assert "decode   max |err|" in out and "MISMATCH" not in out
    assert sorted(p.name for p in dump.iterdir()) == ["decode", "mixed"]
    assert (dump / "decode" / "00-capture.txt").read_text().startswith("# phase: decode")


def test_bad_input_gives_clear_errors(tmp_path, capsys):
    assert main(["lower", "--hf-config", str(tmp_path / "nope.json")]) == 2
    assert "error: Hugging Face config not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["lower", "--preset", "gpt-2"])
    assert "invalid choice: 'gpt-2'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["lower", "--preset", "deepseek-v3", "--block-size", "0"])
    assert "--block-size must be >= 1, got 0" in capsys.readouterr().err


def test_console_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "mla_graph.cli", "lower", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for flag in ("--preset", "--hf-config", "--target", "--phase", "--dump", "--verify", "--tp-size"):
        assert flag in out.stdout

"""The mla-graph command line, end to end: exit codes, messages, files written or not, and the
defaults and lists every subcommand shares."""
import argparse
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import V3_TINY

from mla_graph.cli import build_parser, main
from mla_graph.commands._common import DEFAULT_TARGET, PRESETS
from mla_graph.targets import TARGETS
from mla_graph.passes import PassResult, graph_pass, no_namespace

TINY = ["--dtype", "fp32", "--block-size", "16"]


@pytest.fixture
def tiny_hf_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(V3_TINY.to_hf()))
    return path


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("a regular file")
    return path


def test_lower_prints_pipeline_writes_dumps_and_verifies(tiny_hf_config, tmp_path, capsys):
    dump = tmp_path / "dumps"
    code = main(["lower", "--hf-config", str(tiny_hf_config), *TINY, "--target", "reference",
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
    for flag in ("--block-size", "--tp-size"):
        with pytest.raises(SystemExit) as info:
            main(["lower", "--preset", "deepseek-v3", flag, "0"])
        assert info.value.code == 2
        assert f"argument {flag}: expected a positive integer, got '0'" in capsys.readouterr().err


def test_console_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "mla_graph.cli", "lower", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for flag in ("--preset", "--hf-config", "--target", "--phase", "--dump", "--verify", "--tp-size"):
        assert flag in out.stdout
    assert "exit status: 0 clean; 1 findings" in out.stdout


# ---- output paths are checked before any work ------------------------------------------------------

def no_bench(*args, **kwargs):
    raise AssertionError("the benchmarks ran although an argument was unusable")


def output_commands(config, target: str) -> list[list[str]]:
    return [["lower", "--hf-config", str(config), *TINY, "--target", "reference", "--dump", target],
            ["dump", "--hf-config", str(config), *TINY, "--target", "reference", "--out", target],
            ["bench", "--quick", "--out", target]]


@pytest.mark.parametrize("which", [0, 1, 2], ids=["lower --dump", "dump --out", "bench --out"])
def test_an_output_folder_under_a_file_is_a_usage_error_before_any_work(which, tiny_hf_config, a_file, capsys,
                                                                         monkeypatch):
    monkeypatch.setattr("mla_graph.bench.run_benchmarks", no_bench)
    target = str(a_file / "out")
    argv = output_commands(tiny_hf_config, target)[which]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    flag = argv[argv.index(target) - 1]
    assert err == f"mla-graph: error: {flag} {target}: {a_file} is a file, not a folder; pass a path whose " \
                  f"parents are folders\n"
    assert out == ""                                     # nothing was built, lowered or measured
    assert a_file.read_text() == "a regular file"


@pytest.mark.parametrize("which", [0, 1, 2], ids=["lower --dump", "dump --out", "bench --out"])
def test_an_output_folder_that_is_a_file_is_a_usage_error(which, tiny_hf_config, a_file, capsys, monkeypatch):
    monkeypatch.setattr("mla_graph.bench.run_benchmarks", no_bench)
    argv = output_commands(tiny_hf_config, str(a_file))[which]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert f"{a_file}: exists and is not a folder" in err and err.count("\n") == 1 and out == ""


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_a_usage_error(tiny_hf_config, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("mla_graph.bench.run_benchmarks", no_bench)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        for argv in output_commands(tiny_hf_config, str(locked)):
            assert main(argv) == 2
            assert "cannot write in it (Permission denied)" in capsys.readouterr().err
        assert main(output_commands(tiny_hf_config, str(locked / "new"))[1]) == 2
        assert "cannot create it (Permission denied)" in capsys.readouterr().err
    finally:
        locked.chmod(0o755)


def test_bench_checks_docs_before_measuring(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("mla_graph.bench.run_benchmarks", no_bench)
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nno generated section\n")
    assert main(["bench", "--quick", "--out", str(tmp_path / "out"), "--docs", str(docs)]) == 2
    err = capsys.readouterr().err
    assert f"--docs {docs}: has no <!-- bench:begin --> ... <!-- bench:end --> section" in err
    assert main(["bench", "--quick", "--out", str(tmp_path / "out"), "--docs", str(tmp_path / "none.md")]) == 2
    assert "--docs " + str(tmp_path / "none.md") + ": cannot rewrite it (No such file or directory)" in \
        capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bench_keeps_the_sections_measured_before_a_failure(tmp_path, capsys, monkeypatch):
    """A section that fails after minutes of measuring loses nothing measured before it."""
    import json

    import mla_graph.bench as bench

    monkeypatch.setattr(bench, "unfilled_layers", lambda *a, **k: [None])
    monkeypatch.setattr(bench, "kernels_per_decode", lambda s, layer: {"targets": {}, "marker": "kernels"})
    monkeypatch.setattr(bench, "lowering_cost", lambda s, layers, log: {"marker": "lowering"})

    def fails(s, log):
        raise RuntimeError("decode step broke")
    monkeypatch.setattr(bench, "decode_step", fails)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="decode step broke"):
        main(["bench", "--quick", "--out", str(out)])
    saved = json.loads((out / "results.partial.json").read_text())
    assert saved["partial"] is True
    assert saved["kernels_per_decode"]["marker"] == "kernels" and saved["lowering_cost"]["marker"] == "lowering"
    assert "decode_step" not in saved
    assert f"the sections measured so far are in {out / 'results.partial.json'}" in capsys.readouterr().err


# ---- --verify --------------------------------------------------------------------------------------

@graph_pass()
def double_the_attention_scale(gm):
    """A wrong rewrite: attention(..., scale) -> attention(..., 2 * scale)."""
    result = PassResult(changed=False)
    for node in gm.graph.nodes:
        if node.target is torch.ops.mla.attention.default:
            node.args = (*node.args[:-1], 2 * node.args[-1])
            result.count("double_scale")
    gm.recompile()
    return result


@graph_pass(ensures=[no_namespace("mla")])
def claims_too_much(gm):
    """Says no mla:: op is left, and lowers nothing."""
    return PassResult(changed=False)


def with_extra_pass(extra):
    reference = TARGETS["reference"]
    return reference.extended({"tidy": [extra]})


def test_verify_reports_a_wrong_lowering_and_exits_1(tiny_hf_config, capsys, monkeypatch):
    monkeypatch.setitem(TARGETS, "reference", with_extra_pass(double_the_attention_scale))
    code = main(["lower", "--hf-config", str(tiny_hf_config), *TINY, "--target", "reference", "--phase", "decode",
                 "--verify"])
    out, err = capsys.readouterr()
    assert code == 1
    assert re.search(r"^  decode   max \|err\| \S+ .*: MISMATCH$", out, re.M)
    assert err == ("mla-graph: verification failed for decode: the lowered module disagrees with the plain "
                   "definition (see above)\n")


def test_verify_runs_the_lowered_module_in_checked_mode(tiny_hf_config, capsys, monkeypatch):
    import mla_graph.lowering
    seen = []
    real_lower = mla_graph.lowering.lower

    def recording_lower(*args, **kwargs):
        lowered = real_lower(*args, **kwargs)
        seen.append(lowered.checked)
        return lowered

    monkeypatch.setattr(mla_graph.lowering, "lower", recording_lower)
    argv = ["lower", "--hf-config", str(tiny_hf_config), *TINY, "--target", "reference", "--phase", "decode"]
    assert main(argv + ["--verify"]) == 0 and main(argv) == 0
    assert seen == [True, None]                  # without --verify, $MLA_GRAPH_CHECKED decides as usual
    assert "(random batch per phase, checked mode)" in capsys.readouterr().out


def test_a_pass_that_breaks_its_promise_exits_1_without_a_traceback(tiny_hf_config, capsys, monkeypatch):
    monkeypatch.setitem(TARGETS, "reference", with_extra_pass(claims_too_much))
    assert main(["lower", "--hf-config", str(tiny_hf_config), *TINY, "--target", "reference",
                 "--phase", "decode"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mla-graph: error: after pass 'claims_too_much': ") and "Traceback" not in err


# ---- one source for defaults, presets and labels ---------------------------------------------------

def subcommand_actions() -> dict[str, dict[str, argparse.Action]]:
    parser, _ = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {name: {a.dest: a for a in p._actions} for name, p in sub.choices.items()}


def test_every_subcommand_has_the_same_target_default_and_presets(capsys):
    actions = subcommand_actions()
    assert {name: a["target"].default for name, a in actions.items() if "target" in a} == \
        {"lower": DEFAULT_TARGET, "dump": DEFAULT_TARGET, "check": DEFAULT_TARGET}
    assert actions["lower"]["preset"].choices == actions["dump"]["preset"].choices == PRESETS
    assert "deepseek-r1" in PRESETS
    assert main(["check", "gpt-2"]) == 2                 # check's TARGET_SPEC names the same presets
    assert f"is not a preset ({', '.join(PRESETS)})" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["check", "--help"])
    assert ", ".join(PRESETS) in capsys.readouterr().out


def test_a_phase_run_by_another_pipeline_is_labelled_with_what_ran(tiny_hf_config, capsys):
    assert main(["lower", "--hf-config", str(tiny_hf_config), *TINY, "--target", "torchair",
                 "--phase", "prefill"]) == 0
    out = capsys.readouterr().out
    assert "\n[torchair / prefill: the npu pipeline, run eagerly (torchair compiles only decode and multi_decode as graphs)] " in out
    assert main(["lower", "--hf-config", str(tiny_hf_config), *TINY, "--target", "npu", "--phase", "prefill"]) == 0
    assert "\n[npu / prefill] " in capsys.readouterr().out


def test_dump_checks_only_the_phases_a_graph_mode_target_compiles(tiny_hf_config, tmp_path, capsys):
    out = tmp_path / "dump"
    assert main(["dump", "--hf-config", str(tiny_hf_config), *TINY, "--target", "torchair", "--phase", "prefill",
                 "--out", str(out), "--format", "txt"]) == 0
    stdout = capsys.readouterr().out
    assert "[torchair / prefill: the npu pipeline, run eagerly" in stdout
    assert "torchair check: not run for prefill, which torchair runs eagerly; --check-torchair checks it anyway" \
        in stdout
    assert (out / "prefill" / "summary.json").is_file() and not (out / "prefill" / "torchair.json").exists()


# ---- check and dump --check-torchair: one check -----------------------------------------------------

def findings(report: dict) -> list[tuple[str, str, str]]:
    return [(f["severity"], f["rule"], f["node"]) for f in report["findings"]]


@pytest.mark.parametrize("options", [[], ["--no-static-dims"]], ids=["default", "--no-static-dims"])
def test_check_and_dump_report_the_same_findings_and_exit_1(options, tiny_hf_config, tmp_path, capsys):
    common = [*TINY, "--target", "npu", "--phase", "decode", "--no-toolchain", *options]
    assert main(["check", str(tiny_hf_config), *common, "--json"]) == 1
    checked = json.loads(capsys.readouterr().out)
    out = tmp_path / "dump"
    assert main(["dump", "--hf-config", str(tiny_hf_config), *common, "--check-torchair", "--out", str(out),
                 "--format", "txt,html"]) == 1
    stdout, err = capsys.readouterr()
    dumped = json.loads((out / "decode" / "torchair.json").read_text())
    assert findings(dumped) == findings(checked) and dumped["errors"] == checked["errors"] > 0
    assert dumped["graph"] == checked["checked_graph"] and dumped["graph"] in stdout
    dynamic = [f for f in findings(checked) if f[1] == "dynamic-dim"]
    assert bool(dynamic) == (not options)                # one per input with a symbolic size, unless accepted
    assert err.startswith(f"mla-graph: the torchair check found errors in decode ({dumped['errors']} error(s))")
    assert (out / "report.html").is_file()               # written before the exit status says 1


def test_check_messages_name_cli_flags_not_keyword_arguments(tiny_hf_config, capsys):
    assert main(["check", str(tiny_hf_config), *TINY, "--target", "npu", "--no-toolchain"]) == 1
    out = capsys.readouterr().out
    assert "dynamic-dim" in out and "pass --no-static-dims to accept a dynamic GE graph" in out
    assert "--no-toolchain" in out
    assert not re.findall(r"\b[a-z_]+=(?:False|True|None)\b", out)

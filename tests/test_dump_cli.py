"""`mla-graph dump` and `mla-graph diff` end to end, on the smallest DeepSeek-V3-shaped config the NPU
kernels admit (conftest.V3_NPU, bf16: FIA, the fused cache writer and the rope kernel are emitted), and
the torchair check of a DeepSeek-V3 decode layer at TP 8 with the torch-npu 2.13.0 wheel's toolchain."""
import contextlib
import io
import json
import re
import shutil
import xml.etree.ElementTree as ET

import pytest
import torch
from conftest import V3_NPU

from mla_graph import MLAAttention, ascend_toolchain, lower
from mla_graph.cli import main
from mla_graph.dumptool import write_report
from mla_graph.dumptool.files import write_text_atomic
from mla_graph.targets import TARGETS
from mla_graph.passes import pass_name
from mla_graph.dumptool.render import CREATED_FILL, ERASED_FILL
from mla_graph.stacks import torch_npu_release

TINY = ["--dtype", "bf16", "--block-size", "128", "--phase", "decode"]
SVG_NS = "{http://www.w3.org/2000/svg}"


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def hf_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "config.json"
    path.write_text(json.dumps(V3_NPU.to_hf()))
    return str(path)


@pytest.fixture(scope="module")
def npu_dump(hf_config, tmp_path_factory):
    """One npu decode dump in every format, printing the graph after two passes, checked for torchair."""
    if shutil.which("dot") is None:
        pytest.fail("the svg format needs Graphviz's `dot`: apt-get install graphviz (the Makefile's test "
                    "setup installs it)")
    out = tmp_path_factory.mktemp("npu")
    code, stdout, stderr = run_cli(["dump", "--hf-config", hf_config, *TINY, "--target", "npu", "--out", str(out),
                                    "--format", "txt,dot,svg,html", "--print-after", "absorb_kv_weights",
                                    "--print-after", "remove_noop_views", "--check-torchair"])
    # the eager npu graph writes the cache in place and has symbolic sizes: the torchair check finds errors
    assert code == 1 and "mla-graph: the torchair check found errors in decode" in stderr, stderr
    return out, stdout, json.loads((out / "decode" / "summary.json").read_text())


def changed_stems(summary: dict) -> list[str]:
    return [f"{p['index']:02d}-{p['name']}" for p in summary["passes"] if p["changed"]]


def stem(summary: dict, name: str) -> str:
    """'NN-<pass>' of the pass called `name` (its number depends on the pipeline)."""
    [record] = [p for p in summary["passes"] if p["name"] == name]
    return f"{record['index']:02d}-{name}"


def ops_in_code(text: str) -> dict[str, int]:
    """Count `torch.ops.<ns>.<op>.<overload>(` calls in the FX code of a txt dump (independent of
    the manager's op_histogram, which walks the graph)."""
    code = text.split("\n\nnode ")[0]
    counts: dict[str, int] = {}
    for op in re.findall(r"torch\.ops\.([\w.]+)\(", code):
        counts[op] = counts.get(op, 0) + 1
    return counts


def test_txt_dumps_only_passes_that_changed(npu_dump):
    out, stdout, summary = npu_dump
    phase = out / "decode"
    stems = changed_stems(summary)
    absorb = stem(summary, "absorb_kv_weights")
    assert absorb in stems and stem(summary, "lower_paged_attention") in stems
    unchanged = [p["name"] for p in summary["passes"] if not p["changed"]]
    assert {"remove_noop_views", "lower_context_attention", "lower_paged_attention_to_aten"} <= set(unchanged)
    txt = sorted(p.name for p in phase.glob("*.txt"))
    assert txt == sorted(["00-capture.txt"] + [f"{s}.{w}.txt" for s in stems for w in ("before", "after")])
    for changed in stems:
        assert (phase / f"{changed}.before.txt").read_text() != (phase / f"{changed}.after.txt").read_text()
    absorbed = (phase / f"{absorb}.after.txt").read_text()
    assert "torch.ops.aten.bmm.default" in absorbed
    assert "torch.ops.aten.bmm.default" not in (phase / f"{absorb}.before.txt").read_text()
    bmm_rows = [line.split() for line in absorbed.splitlines() if re.match(r"bmm_default\s", line)]
    assert bmm_rows and bmm_rows[0][-1] == "absorb_kv_weights"   # the table says which pass made it
    final = (phase / f"{stems[-1]}.after.txt").read_text()
    graph_ops = {k: v for k, v in summary["final_ops"].items() if "." in k and k != "aten.sym_size.int"}
    code_ops = {k: v for k, v in ops_in_code(final).items() if k != "aten.sym_size.int"}
    assert graph_ops == code_ops and code_ops["npu.npu_fused_infer_attention_score.default"] == 1


def test_print_after_prints_the_named_passes(npu_dump):
    _, stdout, summary = npu_dump
    banner = f"// ----- decode: after {stem(summary, 'absorb_kv_weights')} -----"
    assert banner in stdout
    assert "// ----- decode: after 01-remove_noop_views (no change) -----" in stdout
    printed = stdout.split(banner)[1].split("[npu / decode]")[0]
    assert "torch.ops.aten.bmm.default" in printed and "npu_fused_infer_attention_score" not in printed
    assert f"after {stem(summary, 'page_latent_attention')}" not in stdout


def dot_nodes(text: str) -> dict[str, str]:
    """node name -> its attribute list, from our DOT output."""
    return dict(re.findall(r'^  "(\w+)" \[(.*)\];$', text, flags=re.M))


def test_dot_marks_created_and_erased_nodes(npu_dump):
    out, _, summary = npu_dump
    phase = out / "decode"
    record = next(p for p in summary["passes"] if p["name"] == "absorb_kv_weights")
    absorb = stem(summary, "absorb_kv_weights")
    after = dot_nodes((phase / f"{absorb}.after.dot").read_text())
    filled = {name for name, attrs in after.items() if f'fillcolor="{CREATED_FILL}"' in attrs}
    assert filled == set(record["created_nodes"]) and len(filled) == record["created"] > 0
    assert 'made by absorb_kv_weights' in after["bmm_default"] and "made by capture" in after["hidden_states"]
    before = dot_nodes((phase / f"{absorb}.before.dot").read_text())
    erased = {name for name, attrs in before.items() if f'fillcolor="{ERASED_FILL}"' in attrs}
    assert erased == set(record["erased_nodes"]) and erased and not erased & set(after)
    edges = re.findall(r'^  "(\w+)" -> "(\w+)";$', (phase / f"{absorb}.after.dot").read_text(), re.M)
    assert ("bmm_default", "permute_default_1") in edges and {a for e in edges for a in e} <= set(after)
    drawn = sorted(p.name for p in phase.glob("*.dot"))
    assert drawn == sorted(["00-capture.dot"] + [f"{s}.{w}.dot" for s in changed_stems(summary)
                                                 for w in ("before", "after")])


def test_svg_is_rendered_by_graphviz(npu_dump):
    out, _, summary = npu_dump
    root = ET.parse(out / "decode" / f"{stem(summary, 'absorb_kv_weights')}.after.svg").getroot()
    assert root.tag == f"{SVG_NS}svg"
    record = next(p for p in summary["passes"] if p["name"] == "absorb_kv_weights")
    created = set(record["created_nodes"])
    orange = set()
    for group in root.iter(f"{SVG_NS}g"):
        title = group.find(f"{SVG_NS}title")
        if group.get("class") == "node" and any(s.get("fill") == CREATED_FILL for s in group.iter()):
            orange.add(title.text)
    assert orange == created


def test_svg_without_graphviz_is_a_clear_error(hf_config, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    code, _, err = run_cli(["dump", "--hf-config", hf_config, *TINY, "--out", str(tmp_path / "d"), "--format", "svg"])
    assert code == 2 and "needs Graphviz's `dot` program" in err and "apt-get install graphviz" in err
    assert not (tmp_path / "d").exists()


def test_html_report_is_self_contained_and_complete(npu_dump):
    out, stdout, summary = npu_dump
    page = (out / "report.html").read_text()
    assert f"report: {out / 'report.html'}" in stdout
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page) and "<link" not in page
    assert "@import" not in page and "url(" not in page
    data = json.loads(re.search(r'<script type="application/json" id="mla-data">(.*?)</script>', page, re.S)
                      .group(1).replace("<\\/", "</"))
    assert [p["name"] for p in data["phases"]] == ["decode"] and data["meta"]["target"] == "npu"
    for stem in changed_stems(summary):
        assert f'id="decode-{stem}"' in page                # a before/after diff per changed pass
    assert 'id="decode-01-remove_noop_views"' not in page
    assert page.count('<table class="diff"') == len(changed_stems(summary))
    assert page.count("<svg") == len(changed_stems(summary))   # the drawings are inlined


def test_torchair_check_names_the_pass_that_made_a_rejected_node(npu_dump):
    out, stdout, summary = npu_dump
    findings = json.loads((out / "decode" / "torchair.json").read_text())["findings"]
    made_by = {row["name"]: row["made_by"] for row in summary["nodes"]}
    # the eager npu pipeline writes the cache in place, which torchair's GE mode cannot convert
    inplace = [f for f in findings if f["op"] == "npu.npu_kv_rmsnorm_rope_cache_v2.default"]
    assert inplace and made_by[inplace[0]["node"]] == "fuse_kv_rmsnorm_rope_cache"
    assert "npu_kv_rmsnorm_rope_cache_v2_functional" in inplace[0]["suggestion"]
    assert inplace[0]["node"] in stdout.split("[npu / decode]")[1]


def test_stop_after_and_dot_only(hf_config, tmp_path):
    code, stdout, err = run_cli(["dump", "--hf-config", hf_config, *TINY, "--target", "npu", "--out", str(tmp_path),
                                 "--format", "dot", "--stop-after", "page_latent_attention"])
    assert code == 0, err
    summary = json.loads((tmp_path / "decode" / "summary.json").read_text())
    assert [p["name"] for p in summary["passes"]][-1] == "page_latent_attention"
    assert summary["stopped_after"] == "page_latent_attention" and "mla.paged_attention.default" in summary["final_ops"]
    files = sorted(p.name for p in (tmp_path / "decode").iterdir())
    stems = [stem(summary, "absorb_kv_weights"), stem(summary, "page_latent_attention")]
    assert changed_stems(summary) == stems
    assert files == sorted(["00-capture.dot", "summary.json"] + [f"{s}.{w}.dot" for s in stems
                                                                 for w in ("before", "after")])
    assert not (tmp_path / "report.html").exists() and "(stopped after page_latent_attention)" in stdout


def test_only_changed_lists_and_prints_only_changing_passes(hf_config, tmp_path):
    code, stdout, err = run_cli(["dump", "--hf-config", hf_config, *TINY, "--target", "npu", "--out", str(tmp_path),
                                 "--format", "txt", "--only-changed", "--print-after", "all"])
    assert code == 0, err
    summary = json.loads((tmp_path / "decode" / "summary.json").read_text())
    changed = changed_stems(summary)
    printed = re.findall(r"// ----- decode: after (\S+)", stdout)
    assert printed == changed and "(no change)" not in stdout
    table = stdout.split("[npu / decode]")[1].split("ops:")[0]
    listed = [f"{m[0]}-{m[1]}" for m in re.findall(r"^(\d\d)\s+(\w+)", table, re.M)]
    assert listed == changed and "remove_noop_views" not in table


def test_bad_flags_give_clear_errors(hf_config, tmp_path, capsys):
    base = ["dump", "--hf-config", hf_config, *TINY, "--target", "reference", "--out", str(tmp_path / "d")]
    code, _, err = run_cli(base + ["--target", "npu", "--stop-after", "absorb"])
    assert code == 2 and "--stop-after 'absorb' is not a pass of the npu pipeline" in err
    assert "valid passes: " + ", ".join(pass_name(fn) for fn in TARGETS["npu"].pipeline("decode")) in err
    code, _, err = run_cli(base + ["--print-after", "lower_rope"])     # not in the reference pipeline
    assert code == 2 and "valid passes: all, remove_noop_views, eliminate_dead_code" in err
    for argv, message in [(base + ["--format", "txt,pdf"], "unknown dump format(s) ['pdf']"),
                          (base + ["--layers", "0"], "--layers: expected a positive integer, got '0'"),
                          (base + ["--target", "gpu"], "invalid choice: 'gpu'"),
                          (["dump", "--hf-config", hf_config], "the following arguments are required: --out")]:
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2 and message in capsys.readouterr().err
    code, _, err = run_cli(["dump", "--hf-config", str(tmp_path / "missing.json"), "--out", str(tmp_path / "d")])
    assert code == 2 and "Hugging Face config not found" in err
    assert not (tmp_path / "d").exists()


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as info:
        main(["dump", "--help"])
    text = capsys.readouterr().out
    assert info.value.code == 0
    for flag in ("--preset", "--hf-config", "--phase", "--target", "--out", "--format", "--print-after",
                 "--stop-after", "--only-changed", "--layers", "--dtype", "--block-size", "--tp-size", "--seed",
                 "MLA_GRAPH_DUMP"):
        assert flag in text, flag
    with pytest.raises(SystemExit):
        main(["diff", "--help"])
    assert "exit status: 0 the dumps are equal, 1 they differ" in capsys.readouterr().out


def test_layers_show_progress_and_a_summary(hf_config, tmp_path):
    code, stdout, err = run_cli(["dump", "--hf-config", hf_config, *TINY, "--target", "reference", "--out",
                                 str(tmp_path), "--format", "txt", "--layers", "3"])
    assert code == 0, err
    assert re.findall(r"lowering layer (\d)/3 \(decode\)", err) == ["1", "2", "3"]
    summary = stdout.split("\nsummary\n")[1]
    row = next(line.split() for line in summary.splitlines() if line.startswith("decode"))
    assert row[1] == "3" and row[-1] == "yes"      # 3 layers, every layer lowered to the same graph


def test_diff_of_two_targets_and_of_equal_dumps(hf_config, npu_dump, tmp_path):
    npu, _, _ = npu_dump
    refs = []
    for name in ("ref_a", "ref_b"):
        code, _, err = run_cli(["dump", "--hf-config", hf_config, *TINY, "--target", "reference", "--out",
                                str(tmp_path / name), "--format", "txt", "--seed", str(len(refs))])
        assert code == 0, err
        refs.append(tmp_path / name)
    code, out, _ = run_cli(["diff", str(refs[0]), str(refs[1])])
    assert code == 0 and "phase decode: equal" in out and out.rstrip().endswith("dumps are equal")
    code, out, _ = run_cli(["diff", str(refs[0]), str(npu)])
    assert code == 1 and "== phase decode: differs ==" in out
    absorb = next(line for line in out.splitlines() if " absorb_kv_weights " in line)
    assert absorb.split()[0] == "*" and "(not run)" in absorb and "changed: 1 match(es)" in absorb
    fia = next(line.split() for line in out.splitlines() if "npu.npu_fused_infer_attention_score.default" in line
               and "call_function" not in line and "torch.ops" not in line)
    assert fia[1:] == ["0", "1", "+1"]
    assert re.search(r"^  \+.*torch\.ops\.npu\.npu_fused_infer_attention_score", out, re.M)   # final graph diff
    code, _, err = run_cli(["diff", str(refs[0]), str(tmp_path / "nope")])
    assert code == 2 and "does not exist" in err


def test_env_var_dumps_from_plain_lower_equal_the_cli_dump(hf_config, npu_dump, tmp_path, monkeypatch):
    monkeypatch.setenv("MLA_GRAPH_DUMP", str(tmp_path))
    monkeypatch.setenv("MLA_GRAPH_DUMP_FORMAT", "txt,dot")
    torch.manual_seed(0)
    lower(MLAAttention(V3_NPU, dtype=torch.bfloat16), "npu", ["decode"], block_size=128)
    phase = tmp_path / "decode"
    absorb = stem(json.loads((phase / "summary.json").read_text()), "absorb_kv_weights")
    assert (phase / f"{absorb}.after.dot").is_file() and (phase / "00-capture.txt").is_file()
    code, out, _ = run_cli(["diff", str(npu_dump[0]), str(tmp_path)])
    assert code == 0, out                                # the same dumps as `mla-graph dump`
    report = write_report(tmp_path).read_text()          # and the same report can be built from them
    assert f'id="decode-{absorb}"' in report


# ---- the torchair check with the wheel's toolchain ------------------------------------------------

@pytest.fixture(scope="module")
def toolchain():
    from wheels import torch_npu_wheel
    return ascend_toolchain.load(torch_npu_wheel())


@pytest.fixture(scope="module")
def torchair_dump(tmp_path_factory, toolchain):
    """DeepSeek-V3 decode at TP 8 (16 heads per rank) for the torchair target."""
    out = tmp_path_factory.mktemp("torchair")
    code, stdout, stderr = run_cli(["dump", "--preset", "deepseek-v3", "--tp-size", "8", "--target", "torchair",
                                    "--phase", "decode", "--out", str(out)])
    assert code == 0, stderr
    return out, stdout


def embedded_data(page: str) -> dict:
    return json.loads(re.search(r'<script type="application/json" id="mla-data">(.*?)</script>', page, re.S)
                      .group(1).replace("<\\/", "</"))


def test_torchair_dump_writes_the_ge_graph_and_reports_what_was_checked(torchair_dump):
    out, stdout = torchair_dump
    phase = out / "decode"
    pbtxt = (phase / "ge_graph.pbtxt").read_text()
    assert 'op: "MlaPrologV3"' in pbtxt and 'op: "FusedInferAttentionScore"' in pbtxt
    assert not [p.name for p in phase.iterdir() if p.name.startswith(".")]   # no temporary files left
    data = json.loads((phase / "torchair.json").read_text())
    assert data["toolchain_used"] and data["errors"] == 0 and data["ge_graph"] == "ge_graph.pbtxt"
    assert "batch bucket 1" in data["graph"]    # the static graph the compiler is handed, not the symbolic one
    types = [op["type"] for op in data["ge_ops"]]
    assert "MlaPrologV3" in types and "FusedInferAttentionScore" in types
    assert any(c.startswith("GE conversion with torchair's own converters") for c in data["checked"])
    [note] = [f for f in data["findings"] if f["rule"] == "kernel-limit"]
    assert note["severity"] == "note" and "num_heads=16" in note["message"]
    printed = stdout.split("[torchair / decode]")[1]
    assert f"torchair check: checked with the torch-npu {torch_npu_release()} wheel's toolchain" in printed
    assert re.search(r"^GE ops: .*MlaPrologV3.*FusedInferAttentionScore", printed, re.M)
    report = embedded_data((out / "report.html").read_text())["phases"][0]["torchair"]
    assert [op["type"] for op in report["ge_ops"]] == types and report["checked"] == data["checked"]


def test_torchair_dump_without_the_toolchain_leaves_no_stale_ge_graph(torchair_dump, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(torchair_dump[0], out)
    assert (out / "decode" / "ge_graph.pbtxt").is_file()
    code, stdout, stderr = run_cli(["dump", "--preset", "deepseek-v3", "--tp-size", "8", "--target", "torchair",
                                    "--phase", "decode", "--out", str(out), "--no-toolchain"])
    assert code == 0, stderr
    assert not (out / "decode" / "ge_graph.pbtxt").exists()    # the earlier run's would pass for this one's
    data = json.loads((out / "decode" / "torchair.json").read_text())
    assert data["scope"].startswith("converter-list check only") and data["ge_ops"] == []
    assert "torchair check: converter-list check only" in stdout and "compatible" not in stdout


def test_write_text_atomic_leaves_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "torchair.json"
    write_text_atomic(path, "old")
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(path, "new \ud800")             # fails while writing
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["torchair.json"]
    with monkeypatch.context() as patch:
        patch.setattr("os.replace", lambda *args: (_ for _ in ()).throw(OSError("disk full")))
        with pytest.raises(OSError, match="disk full"):
            write_text_atomic(path, "new")                 # fails after writing, before the rename
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["torchair.json"]
    write_text_atomic(path, "new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["torchair.json"]

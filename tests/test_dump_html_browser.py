"""The HTML report of `mla-graph dump`, opened in a real headless browser (Debian's `chromium`).

The page must run its script without a console error, render the pipeline, kernel and node
tables from its embedded data, and look right: a screenshot is written for people to check
(MLA_GRAPH_UPDATE_SCREENSHOT=1 also copies it to docs/dump-report.png). Without chromium the
test fails with how to install it, unless MLA_GRAPH_NO_BROWSER=1 says to skip it.
"""
import contextlib
import html
import io
import json
import os
import pathlib
import re
import shutil
import struct
import subprocess

import pytest

from mla_graph.cli import main

DOCS_SCREENSHOT = pathlib.Path(__file__).parent.parent / "docs" / "dump-report.png"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0"]


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("MLA_GRAPH_NO_BROWSER") == "1":
            pytest.skip("MLA_GRAPH_NO_BROWSER=1: the HTML report is not opened in a browser")
        pytest.fail("chromium is not installed; install it (Debian/Ubuntu: apt-get install chromium; `make test` "
                    "does this) or set MLA_GRAPH_NO_BROWSER=1 to skip the browser test")
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("report")
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(["dump", "--preset", "deepseek-v2-lite", "--target", "npu", "--phase", "decode",
                     "--phase", "prefill", "--out", str(out), "--format", "txt,svg,html", "--check-torchair"])
    # 1: the npu graphs have torchair findings (errors); dump writes everything first, then says so
    assert code == 1
    return out / "report.html"


@pytest.fixture(scope="module")
def torchair_report(tmp_path_factory) -> pathlib.Path:
    """DeepSeek-V3 decode at TP 8 for torchair, checked with the torch-npu 2.13.0 wheel's toolchain."""
    from wheels import torch_npu_wheel

    from mla_graph import ascend_toolchain
    ascend_toolchain.load(torch_npu_wheel())
    out = tmp_path_factory.mktemp("torchair")
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(["dump", "--preset", "deepseek-v3", "--tp-size", "8", "--target", "torchair", "--phase", "decode",
                     "--out", str(out)])
    assert code == 0
    return out / "report.html"


def browse(chromium: str, page: pathlib.Path, tmp_path: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args, page.as_uri()],
                          capture_output=True, text=True, timeout=120, check=False)


def console_lines(stderr: str) -> list[str]:
    """Messages the page wrote to the console (chromium logs them as ...:CONSOLE(...)] "...")."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def rendered(dom: str) -> str:
    """The DOM without its script elements: what is left was put there by HTML or by the script."""
    return re.sub(r"<script\b.*?</script>", "", dom, flags=re.S)


def test_console_errors_are_detected(chromium, tmp_path):
    """The check below can fail: a page with a script error yields a CONSOLE line."""
    page = tmp_path / "broken.html"
    page.write_text("<!doctype html><html><body><script>null.x;</script></body></html>")
    result = browse(chromium, page, tmp_path, "--dump-dom")
    assert any("Uncaught TypeError" in line for line in console_lines(result.stderr)), result.stderr[-2000:]


def test_report_renders_its_tables_without_console_errors(chromium, report, tmp_path):
    result = browse(chromium, report, tmp_path, "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    assert console_lines(result.stderr) == []
    dom = rendered(result.stdout)
    assert 'data-ready="1"' in dom                     # the script ran to its last line
    summary = json.loads((report.parent / "decode" / "summary.json").read_text())
    timeline = dom.split('class="timeline" data-phase="decode">')[1].split("</table>")[0]
    assert [p["name"] for p in summary["passes"]] == \
        re.findall(r"<td[^>]*>\d\d</td><td>(?:<a [^>]*>|<span>)(\w+)<", timeline)
    row = re.search(r'<tr data-phase="decode" data-node="npu_fused_infer_attention_score_default">(.*?)</tr>',
                    dom).group(1)
    assert "<td>lower_paged_attention</td>" in row and "in final graph" in row
    kernels = dom.split('class="kernels" data-phase="decode">')[1].split("</table>")[0]
    assert "npu.npu_fused_infer_attention_score.default" in kernels and "[T, 2048]" in kernels
    absorb = next(f"{p['index']:02d}-{p['name']}" for p in summary["passes"] if p["name"] == "absorb_kv_weights")
    histogram = dom.split('class="histogram" data-phase="decode">')[1].split("</table>")[0]
    assert f">{absorb}</th>" in histogram and "mla.paged_attention.default" in histogram
    prefill = json.loads((report.parent / "prefill" / "summary.json").read_text())
    context = next(f"{p['index']:02d}-{p['name']}" for p in prefill["passes"] if p["name"] == "lower_context_attention")
    assert f'id="prefill-{context}"' in dom
    torchair = dom.split('class="torchair" data-phase="decode">')[1].split("</table>")[0]
    finding = re.search(r'<tr class="finding error"><td>error</td><td>no-converter</td>'
                        r"<td><a [^>]*>npu_kv_rmsnorm_rope_cache_v2_default</a></td>(.*?)</tr>", torchair).group(1)
    assert "<td>fuse_kv_rmsnorm_rope_cache</td>" in finding      # the pass that made the rejected node


def png_size(path: pathlib.Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_screenshot_for_people(chromium, report, tmp_path):
    shot = tmp_path / "dump-report.png"
    result = browse(chromium, report, tmp_path, f"--screenshot={shot}", "--window-size=1400,1000",
                    "--hide-scrollbars")
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    assert console_lines(result.stderr) == []
    assert png_size(shot) == (1400, 1000) and shot.stat().st_size > 30_000   # a rendered page, not a blank one
    if os.environ.get("MLA_GRAPH_UPDATE_SCREENSHOT") == "1":
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, DOCS_SCREENSHOT)


def test_torchair_check_shows_what_was_checked_the_findings_and_the_ge_ops(chromium, torchair_report, tmp_path):
    result = browse(chromium, torchair_report, tmp_path, "--dump-dom")
    assert result.returncode == 0 and console_lines(result.stderr) == [], result.stderr[-2000:]
    dom = rendered(result.stdout)
    section = dom.split('class="torchair" data-phase="decode">')[1].split("</section>")[0]
    data = json.loads((torchair_report.parent / "decode" / "torchair.json").read_text())
    assert f'<p class="ok">torchair: no errors, {data["notes"]} note(s) in what was checked</p>' in section
    assert "compatible" not in section
    assert re.findall(r"<li>checked: (.*?)</li>", section) == [html.escape(c, quote=False) for c in data["checked"]]
    notes = re.findall(r'<tr class="finding note"><td>note</td><td>([\w-]+)</td><td>(\w+)</td>', section)
    assert ("kernel-limit", "npu_fused_infer_attention_score") in notes and len(notes) == data["notes"]
    ge_ops = re.findall(r'<tr class="ge-op"><td class="num">\d+</td><td>\w+</td><td>(\w+)</td>', section)
    assert ge_ops == [op["type"] for op in data["ge_ops"]]
    assert {"MlaPrologV3", "FusedInferAttentionScore"} <= set(ge_ops)
    assert '<a href="decode/ge_graph.pbtxt">ge_graph.pbtxt</a>' in section
    overview = dom.split('id="overview-table">')[1].split("</table>")[0]
    assert f"<td>no errors, {data['notes']} note(s)</td>" in overview

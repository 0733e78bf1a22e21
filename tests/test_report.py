"""The static HTML report of a results root: charts inline, nothing fetched, everything escaped."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from editkit.__main__ import main
from editkit.report import build_report, summarised_manifest, write_report
from editkit.results import load_results
from editkit.runs import run_study
from tests.test_runs import FAST_ROME, tiny_config

CHART_TITLES = ("Benchmark scores", "Edit quality", "Paired change: gold log-likelihood", "Paired change: accuracy",
                "Model health")
# Anything the browser would fetch: a script or stylesheet by URL, a CSS import, a url() to another host.
LOADS = re.compile(r"""<script\b|<link\b|@import|\b(?:src|href)\s*=\s*["']?\s*(?:https?:)?//"""
                   r"""|url\(\s*["']?\s*(?:https?:)?//""", re.IGNORECASE)


@pytest.fixture(scope="module")
def root(make_tiny, tmp_path_factory) -> Path:
    """A results root of two tiny runs (ROME and FT, 2 edits, checkpoints 0, 1, 2, health on), built once."""
    results_dir = tmp_path_factory.mktemp("report") / "root"
    overrides = {**FAST_ROME, "ft": {"layers": [1], "num_steps": 2}}
    config = tiny_config(results_dir, methods=["rome", "ft"], n_edits=2, checkpoints=[0, 1, 2], heldout_chunks=4,
                         editor_overrides=overrides)
    run_study(config, progress=False, lm=make_tiny("llama"))
    return results_dir


@pytest.fixture(scope="module")
def results(root):
    return load_results(root)


@pytest.fixture(scope="module")
def page(results) -> str:
    return build_report(results, generated="2026-01-01 00:00:00 UTC")


def test_every_chart_is_an_inline_svg_and_nothing_is_fetched(page, results):
    assert page.startswith("<!DOCTYPE html>")
    assert page.count("<svg") == len(CHART_TITLES), "one drawing per chart"
    for title in CHART_TITLES:
        chart = page.split(f"<h3>{title}</h3>", 1)[1].split("<h3>", 1)[0]
        assert "<svg" in chart and "Not drawn" not in chart, title
    assert not LOADS.findall(page), "the page must open offline: no script, stylesheet or image by URL"
    # Every chart's ids are prefixed: one document, one id space.
    ids = re.findall(r'\sid="([^"]+)"', page)
    assert len(ids) == len(set(ids))
    for run_id in results.checkpoints["run_id"].unique():
        assert run_id.startswith(("rome-", "ft-")) and run_id in page


def test_header_and_findings_tables(page, results, root):
    assert str(root.resolve()) in page and "2026-01-01 00:00:00 UTC" in page
    assert "<dt>cells</dt><dd>2</dd>" in page and "<dt>verified checkpoints</dt><dd>6</dd>" in page
    assert "Every checkpoint verified" in page
    for heading in ("accuracy (acc)", "gold log-likelihood (loglik)", "Latest scores", "Model health",
                    "All checkpoints"):
        assert f">{heading}</h" in page, heading
    findings = page.split("id='findings'", 1)[1]
    assert "first_drop" in findings and "heldout_ppl_ratio" in findings and "mmlu_cloze" in findings
    assert "eval_seconds" in findings and "edit_seconds" in findings
    # The latest scores are the 2-edit checkpoint, with the unedited value beside it.
    latest = findings.split(">Latest scores</h3>", 1)[1].split("</table>", 1)[0]
    assert re.search(r"<td>2</td>\s*<td>mmlu_cloze</td>", latest)
    assert re.search(r"\d\.\d{4} \[\d\.\d{4}, \d\.\d{4}\]", latest), "value [ci_low, ci_high]"


def test_manifests_are_shown_with_case_ids_summarised(page, root):
    cells = sorted(p.parent for p in root.glob("*/manifest.json"))
    assert len(cells) == 2
    for cell in cells:
        manifest = json.loads((cell / "manifest.json").read_text())
        assert len(manifest["case_ids"]) == 2
        assert f"<summary>{cell.name}</summary>" in page
        assert manifest["git_commit"] is None or str(manifest["git_commit"]) in page
    assert "&quot;case_ids&quot;: [" not in page, "the list itself is not shown"
    assert page.count("2 case ids (listed in manifest.json)") == 2
    assert "data_checksums" in page and "versions" in page and "model_info" in page
    assert summarised_manifest({"case_ids": [1, 2, 3], "a": 1}) == {"case_ids": "3 case ids (listed in manifest.json)",
                                                                   "a": 1}


def test_strings_from_the_results_are_escaped(results):
    checkpoints = results.checkpoints.copy()
    checkpoints.loc[1, ["status", "reason"]] = ["collapsed", "<b>bold</b> & <script>alert(1)</script>"]
    checkpoints.loc[2, "run_id"] = "run<1>"
    problems = pd.DataFrame([{"run_id": "cell<x>", "n_edits": 1, "problem": "meta.json is missing <here>"}])
    page = build_report(dataclasses.replace(results, checkpoints=checkpoints, problems=problems),
                        title="<i>title</i>", specs=False)
    assert "<b>bold</b>" not in page and "<script" not in page and "<i>title</i>" not in page
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; &lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "run&lt;1&gt;" in page and "&lt;i&gt;title&lt;/i&gt;" in page
    # Verification problems are in the header, in the red box, before any chart.
    box = page.split('<div class="problems">', 1)[1].split("id='charts'", 1)[0]
    assert "1 verification problem(s)" in box and "cell&lt;x&gt;" in box and "missing &lt;here&gt;" in box
    # The collapsed checkpoint is listed on its own.
    unusual = page.split(">Collapsed or stopped</h3>", 1)[1].split("</table>", 1)[0]
    assert "collapsed" in unusual and "Vega-Lite specification" not in page


def test_the_offline_check_sees_what_altair_html_loads():
    """Altair's own HTML export fetches Vega from a CDN: the check that the report does not must see it."""
    import altair as alt

    exported = alt.Chart(pd.DataFrame({"x": [1]})).mark_point().encode(x="x").to_html()
    assert LOADS.search(exported)
    assert not LOADS.search('<svg class="marks"><text>https://example.org</text></svg><pre>"$schema": "https://"</pre>')


def test_empty_frames_are_noted_not_drawn(tmp_path):
    """No model: a root whose cell has a manifest but no checkpoint yet."""
    cell = tmp_path / "rome-0000000000"
    cell.mkdir()
    (cell / "manifest.json").write_text(json.dumps({"run_id": cell.name, "case_ids": list(range(7))}))
    page = build_report(load_results(tmp_path))
    assert "<svg" not in page
    for name in ("scores", "edit_quality", "deltas", "health"):
        assert f"Not drawn: results.{name} has no rows." in page
    assert "7 case ids" in page and "config.json is missing" in page and "No verified checkpoints." in page


def test_cli_writes_the_report_and_refuses_an_empty_root(root, tmp_path, caplog, capsys):
    output = tmp_path / "out" / "report.html"
    assert main(["report", str(root), "--output", str(output), "--title", "Tiny <study>", "--no-specs"]) == 0
    assert capsys.readouterr().out.strip() == str(output)
    text = output.read_text(encoding="utf-8")
    assert "<title>Tiny &lt;study&gt;</title>" in text and text.count("<svg") == len(CHART_TITLES)
    assert main(["report", str(root)]) == 0 and (root / "report.html").is_file()
    (root / "report.html").unlink()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2
    assert "holds no results" in caplog.text
    assert main(["report", str(tmp_path / "absent")]) == 2
    assert "no such folder" in caplog.text
    one_cell = next(root.glob("*/checkpoints")).parent
    with pytest.raises(ValueError, match="pass its parent"):
        write_report(one_cell, tmp_path / "x.html")


def _distinct_bytes_of_png(data: bytes) -> int:
    """How many distinct byte values the PNG's decompressed scanlines hold.

    A single-colour image, under any of PNG's row filters, is all zeros but for the filter
    bytes, its colour and a few residuals of the first row and column: under 10 distinct
    values. A rendered page with anti-aliased text and charts uses all 256.
    """
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    position, chunks = 8, []
    while position < len(data):
        length = int.from_bytes(data[position:position + 4], "big")
        if data[position + 4:position + 8] == b"IDAT":
            chunks.append(data[position + 8:position + 8 + length])
        position += 12 + length
    return int(np.unique(np.frombuffer(zlib.decompress(b"".join(chunks)), dtype=np.uint8)).size)


def test_headless_chromium_renders_the_page(root, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium)")
    page = write_report(root, tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1280,2000", page.resolve().as_uri()],
                   check=True, capture_output=True, timeout=180)
    data = shot.read_bytes()
    assert len(data) > 20_000, f"screenshot of {len(data)} bytes: blank?"
    assert _distinct_bytes_of_png(data) > 32, "the screenshot is a single colour"

"""One self-contained static HTML page of a results root: charts, findings tables, manifests.

``python -m editkit report ROOT`` (or :func:`write_report`) reads a results root with
:func:`editkit.results.load_results` and writes one file that opens offline and needs no
JavaScript: every chart of :mod:`editkit.viz` and :mod:`editkit.viz_instruments` is
rendered by vl-convert to an inline SVG (Altair's own HTML export loads Vega from a CDN),
tables are pandas ``to_html`` with escaping on, the stylesheet is inline, and every string
read from the results (run ids, collapse reasons, manifests) is HTML-escaped.

The page has, in order:

* a header: the root, when the page was generated, the number of cells and checkpoints,
  and every checkpoint that failed verification (:attr:`Results.problems`), in a red box;
* the charts: scores, edit quality, the paired change of the gold log-likelihood and of
  accuracy, and model health, each drawn only when its frame has rows (a note otherwise);
* findings: the first significant drop per run and task (:func:`editkit.paired.first_significant_drop`)
  for accuracy and log-likelihood, the latest scores of every run beside its unedited
  scores, model health per checkpoint, and the checkpoints (status, reason, timings);
* every cell's ``manifest.json`` and ``config.json`` in a collapsible block, with the
  edited ``case_ids`` replaced by their count.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    import altair as alt

    from .results import Results

__all__ = ["NoResultsError", "build_report", "write_report"]

log = logging.getLogger(__name__)

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1400px;
       padding: 0 1.5em; color: #222; line-height: 1.4; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
dl.meta { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dl.meta dt { font-weight: 600; } dl.meta dd { margin: 0; font-family: ui-monospace, monospace; }
.problems { border: 3px solid #c62828; background: #fdecea; padding: 0.5em 1em; margin: 1em 0; }
.problems h2 { color: #c62828; border: none; margin-top: 0.3em; }
.ok { border-left: 4px solid #2e7d32; background: #edf7ed; padding: 0.4em 1em; }
.note { color: #666; font-style: italic; }
.chart, .table { overflow-x: auto; margin-bottom: 1.5em; }
.chart svg { overflow: visible; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
thead th { background: #f3f3f3; position: sticky; top: 0; }
tbody tr:nth-child(even) { background: #fafafa; }
td { font-variant-numeric: tabular-nums; }
details { margin: 0.4em 0; } summary { cursor: pointer; font-weight: 600; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; font-size: 0.8em; }
nav a { margin-right: 1em; }
"""


class NoResultsError(ValueError):
    """A results root that does not exist or holds no cell folder."""


def cell_folders(root: Path) -> list[Path]:
    """The cell folders directly under ``root``: those with a ``checkpoints/`` folder or a ``manifest.json``."""
    found = {p.parent for p in root.glob("*/checkpoints") if p.is_dir()}
    found |= {p.parent for p in root.glob("*/manifest.json")}
    return sorted(found)


def _escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(frame: pd.DataFrame, empty: str) -> str:
    """``frame`` as an escaped HTML table (no index), or the note ``empty`` when it has no rows."""
    if frame.empty:
        return f'<p class="note">{_escape(empty)}</p>'
    body = frame.to_html(index=False, escape=True, na_rep="–", border=0,
                         float_format=lambda v: f"{v:.4g}")
    return f'<div class="table">{body}</div>'


def _number(value: float) -> str:
    # Scores and rates in [0, 1] with four decimals; a perplexity ratio of 8e10 in exponent form.
    return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.3e}"


def _interval(value: Any, low: Any, high: Any) -> str:
    """``0.2500 [0.1000, 0.4000]``; the interval is left out where it is missing, ``–`` for no value."""
    if value is None or pd.isna(value):
        return "–"
    if low is None or high is None or pd.isna(low) or pd.isna(high):
        return _number(value)
    return f"{_number(value)} [{_number(low)}, {_number(high)}]"


# ---------------------------------------------------------------- charts


def _spec(chart: alt.TopLevelMixin) -> dict[str, Any]:
    """The chart's Vega-Lite specification with its data inlined, as strict JSON values.

    NaN and infinities (a NaN ``parameter`` column of the health rows, say) are not JSON:
    Altair writes them as bare ``NaN``, which vl-convert refuses to parse. They become null.
    """
    import altair as alt

    # Big grids exceed Altair's default limit of 5000 inlined rows; the context restores it.
    with alt.data_transformers.disable_max_rows():
        text = chart.to_json()
    return json.loads(text, parse_constant=lambda _: None)


def _svg(spec: dict[str, Any], prefix: str) -> str:
    """The chart rendered to SVG by vl-convert, with ids made unique to this chart in the page.

    Several SVGs inline in one HTML document share one id space, and vl-convert numbers
    clip paths and gradients from 1 in every chart: without a prefix, ``url(#clip1)`` in
    the second chart would point at the first chart's clip path.
    """
    import vl_convert

    svg = vl_convert.vegalite_to_svg(json.dumps(spec))
    svg = re.sub(r'\sid="([^"]+)"', rf' id="{prefix}\1"', svg)
    svg = re.sub(r"url\(#([^)]+)\)", rf"url(#{prefix}\1)", svg)
    svg = re.sub(r'href="#([^"]+)"', rf'href="#{prefix}\1"', svg)
    # Namespace declarations are implied for <svg> inside HTML; dropping them leaves no URL in the drawing.
    return re.sub(r'\sxmlns(:\w+)?="[^"]*"', "", svg, count=2)


def _chart_builders(results: Results) -> list[tuple[str, str, pd.DataFrame, Callable[[], alt.TopLevelMixin]]]:
    """(title, frame name, frame, builder) of every chart of the page, in order."""
    from .viz import edit_quality_curves, score_curves
    from .viz_instruments import delta_curves, health_curves

    deltas = results.deltas
    return [
        ("Benchmark scores", "scores", results.scores, lambda: score_curves(results.scores)),
        ("Edit quality", "edit_quality", results.edit_quality, lambda: edit_quality_curves(results.edit_quality)),
        ("Paired change: gold log-likelihood", "deltas", deltas, lambda: delta_curves(deltas, metric="loglik")),
        ("Paired change: accuracy", "deltas", deltas, lambda: delta_curves(deltas, metric="acc")),
        ("Model health", "health", results.health, lambda: health_curves(results.health)),
    ]


def _charts(results: Results, specs: bool) -> str:
    parts = ["<h2 id='charts'>Charts</h2>"]
    for index, (title, name, frame, build) in enumerate(_chart_builders(results)):
        parts.append(f"<h3>{_escape(title)}</h3>")
        if frame.empty:
            parts.append(f'<p class="note">Not drawn: results.{name} has no rows.</p>')
            continue
        try:
            spec = _spec(build())
            svg = _svg(spec, f"c{index}-")
        except ValueError as error:  # the builders' contract: nothing of this kind to draw
            parts.append(f'<p class="note">Not drawn: {_escape(error)}</p>')
            continue
        parts.append(f'<div class="chart">{svg}</div>')
        if specs:
            parts.append(f"<details><summary>Vega-Lite specification (with its data)</summary>"
                         f"<pre>{_escape(json.dumps(spec, indent=1))}</pre></details>")
    return "\n".join(parts)


# ---------------------------------------------------------------- findings tables


def _drops(results: Results) -> str:
    from .paired import first_significant_drop

    parts = ["<h3>First significant drop</h3>",
             "<p>Per run and task, the fewest edits at which the paired change against the unedited model is a "
             "significant drop (Holm-adjusted over the run's checkpoints, α = 0.05).</p>"]
    for metric, label in (("acc", "accuracy"), ("loglik", "gold log-likelihood")):
        parts.append(f"<h4>{_escape(label)} ({metric})</h4>")
        if results.deltas.empty:
            parts.append('<p class="note">No paired changes: no run has both an unedited and an edited '
                         'checkpoint with benchmark items.</p>')
            continue
        try:
            drops = first_significant_drop(results.deltas, metric=metric)
        except ValueError as error:
            parts.append(f'<p class="note">{_escape(error)}</p>')
            continue
        drops["first_drop"] = [("none" if pd.isna(v) else str(int(v))) for v in drops["first_drop"]]
        parts.append(_table(drops, f"no {metric} rows"))
    return "\n".join(parts)


def latest_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """Each run's scores at its last scored checkpoint beside its unedited ones, as ``value [ci_low, ci_high]``.

    A collapsed checkpoint has no score (NaN), so the last checkpoint with a score is
    shown; collapses are in the checkpoints table. Per-subject breakdowns (tasks named
    ``"mmlu/<subject>"``) are left out.
    """
    columns = ["run_id", "model", "method", "n_edits", "task", "metric", "value", "unedited", "n"]
    frame = scores[~scores["task"].astype(str).str.contains("/") & scores["value"].notna()]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    keys = ["run_id", "task", "metric"]
    start = frame[frame["n_edits"] == 0].drop_duplicates(keys).set_index(keys)
    latest = frame[frame["n_edits"] == frame.groupby("run_id")["n_edits"].transform("max")].copy()
    latest["value"] = [_interval(*row) for row in zip(latest["value"], latest["ci_low"], latest["ci_high"])]
    latest["unedited"] = [_interval(*start.loc[key, ["value", "ci_low", "ci_high"]]) if key in start.index else "–"
                          for key in zip(latest["run_id"], latest["task"], latest["metric"])]
    return latest[columns].reset_index(drop=True)


def health_summary(health: pd.DataFrame) -> pd.DataFrame:
    """Held-out perplexity ratio (with its paired interval) and largest norm growth, per run and checkpoint."""
    columns = ["run_id", "model", "method", "n_edits", "heldout_ppl_ratio", "max_rel_norm_growth"]
    if health.empty:
        return pd.DataFrame(columns=columns)
    summary = health[health["parameter"].isna()].drop_duplicates(["run_id", "n_edits", "metric"])
    keys = ["run_id", "model", "method", "n_edits"]
    table = summary[keys].drop_duplicates().set_index(keys)
    ratio = summary[summary["metric"] == "heldout_ppl_ratio"].set_index(keys)
    growth = summary[summary["metric"] == "max_rel_norm_growth"].set_index(keys)["value"]
    table["heldout_ppl_ratio"] = [_interval(*ratio.loc[key, ["value", "ci_low", "ci_high"]]) if key in ratio.index
                                  else "–" for key in table.index]
    table["max_rel_norm_growth"] = [growth.get(key, float("nan")) for key in table.index]
    return table.reset_index().sort_values(["run_id", "n_edits"], kind="stable").reset_index(drop=True)


def _findings(results: Results) -> str:
    checkpoints = results.checkpoints
    unusual = checkpoints[(checkpoints["status"] != "ok") | checkpoints["reason"].fillna("").astype(bool)]
    return "\n".join([
        "<h2 id='findings'>Findings</h2>",
        _drops(results),
        "<h3>Latest scores</h3><p>Each run at its last checkpoint with a score (a collapsed checkpoint has none: "
        "see the checkpoints); <em>unedited</em> is the same run at 0 edits. value [95% CI].</p>",
        _table(latest_scores(results.scores), "No scores."),
        "<h3>Model health</h3><p>Held-out perplexity over the unedited model's (paired 95% CI) and the largest "
        "‖W − W₀‖ / ‖W₀‖ of an edited matrix.</p>",
        _table(health_summary(results.health), "No health rows (health was off, or nothing was saved)."),
        "<h2 id='checkpoints'>Checkpoints</h2>",
        "<h3>Collapsed or stopped</h3>",
        _table(unusual, "Every checkpoint finished with status ok."),
        "<h3>All checkpoints</h3><p>Timings in seconds; <em>attempts</em> counts the processes that worked on "
        "the checkpoint.</p>",
        _table(checkpoints, "No verified checkpoints."),
    ])


# ---------------------------------------------------------------- header and manifests


def _read_cell_json(path: Path) -> tuple[Any, str | None]:
    """A cell's JSON file and None, or None and why it could not be read."""
    if not path.is_file():
        return None, f"{path.name} is missing"
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except (OSError, ValueError) as error:
        return None, f"{path.name} is unreadable ({type(error).__name__}: {error})"


def summarised_manifest(manifest: Any) -> Any:
    """The manifest with its ``case_ids`` list replaced by a count (the list can hold thousands of ids)."""
    if isinstance(manifest, dict) and isinstance(manifest.get("case_ids"), list):
        return {**manifest, "case_ids": f"{len(manifest['case_ids'])} case ids (listed in manifest.json)"}
    return manifest


def _manifests(cells: list[Path]) -> str:
    parts = ["<h2 id='manifests'>Cells and their manifests</h2>",
             "<p>What each cell ran: versions, digests, git commit, data checksums and model information.</p>"]
    for cell in cells:
        blocks = []
        for name, transform in (("manifest.json", summarised_manifest), ("config.json", lambda v: v)):
            payload, problem = _read_cell_json(cell / name)
            if problem is not None:
                blocks.append(f'<p class="note">{_escape(problem)}</p>')
            else:
                text = json.dumps(transform(payload), indent=2, sort_keys=True, default=str)
                blocks.append(f"<h4>{name}</h4><pre>{_escape(text)}</pre>")
        parts.append(f"<details><summary>{_escape(cell.name)}</summary>{''.join(blocks)}</details>")
    if not cells:
        parts.append('<p class="note">No cell folders.</p>')
    return "\n".join(parts)


def _header(results: Results, title: str, generated: str, cells: list[Path]) -> str:
    problems = results.problems
    facts = [("results root", str(Path(results.results_dir).resolve())), ("generated", generated),
             ("cells", str(len(cells))), ("verified checkpoints", str(len(results.checkpoints))),
             ("runs", str(results.checkpoints["run_id"].nunique())),
             ("checkpoints that failed verification", str(len(problems)))]
    meta = "".join(f"<dt>{_escape(k)}</dt><dd>{_escape(v)}</dd>" for k, v in facts)
    if len(problems):
        verdict = (f'<div class="problems"><h2 id="problems">{len(problems)} verification problem(s)</h2>'
                   "<p>These checkpoints are left out of every chart and table below "
                   "(<code>python -m editkit verify ROOT</code> lists every file).</p>"
                   f"{_table(problems, '')}</div>")
    else:
        verdict = '<p class="ok">Every checkpoint verified against its checksums.</p>'
    nav = ("<nav><a href='#charts'>Charts</a><a href='#findings'>Findings</a>"
           "<a href='#checkpoints'>Checkpoints</a><a href='#manifests'>Manifests</a></nav>")
    return f"<header><h1>{_escape(title)}</h1><dl class='meta'>{meta}</dl>{verdict}{nav}</header>"


def build_report(results: Results, *, title: str | None = None, generated: str | None = None,
                 specs: bool = True) -> str:
    """The whole page as one HTML string; reads only the cells' manifests besides ``results``.

    Args:
        results: a loaded results root (:func:`editkit.results.load_results`).
        title: the page's title (default: ``editkit report: <root folder name>``).
        generated: the generation time shown in the header (default: now, UTC).
        specs: add each chart's Vega-Lite specification, with its data, under the chart.

    Returns:
        A self-contained HTML document: inline CSS and SVG, no script, nothing fetched.
    """
    root = Path(results.results_dir)
    title = title or f"editkit report: {root.name}"
    generated = generated or datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    cells = cell_folders(root)
    body = "\n".join([_header(results, title, generated, cells), _charts(results, specs), _findings(results),
                      _manifests(cells)])
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{_escape(title)}</title>\n'
            f"<style>{_CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def write_report(results_dir: str | os.PathLike[str], output: str | os.PathLike[str] | None = None, *,
                 title: str | None = None, specs: bool = True) -> Path:
    """Write the report of a results root to ``output`` (default ``<results_dir>/report.html``).

    Returns:
        The path written. The file is complete or absent (written under a temporary name, then renamed).

    Raises:
        NoResultsError: ``results_dir`` does not exist or has no cell folder.
    """
    from .resources import atomic_write_text
    from .results import load_results

    root = Path(results_dir)
    if not root.is_dir():
        raise NoResultsError(f"{root}: no such folder")
    if not cell_folders(root):
        hint = " (it is one cell's folder: pass its parent)" if (root / "checkpoints").is_dir() else ""
        raise NoResultsError(f"{root} holds no results: no cell folder with checkpoints/ or manifest.json{hint}")
    page = build_report(load_results(root), title=title, specs=specs)
    path = Path(output) if output is not None else root / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, page)
    log.info("report of %d cell(s) in %s (%.0f KB)", len(cell_folders(root)), path, len(page.encode()) / 1024)
    return path

"""Altair chart builders over the tidy frames of :class:`editkit.results.Results`.

Every builder takes a data frame and returns an ``alt.Chart`` (or a compound chart);
none displays, saves or reads files. :func:`save_chart` writes a chart next to the
results it was drawn from, so a figure can always be regenerated from saved files.

Two conventions hold across charts:

* The x axis is the number of sequential edits on a *symlog* scale. Checkpoints are
  roughly geometric (0, 1, 5, 10, ..., 1000), so a linear axis squeezes everything
  before 100 edits into a sliver, and a log axis cannot show the unedited model at
  0 edits. Symlog is linear near zero and logarithmic beyond its constant (1 here),
  so 0 and 1 sit one unit apart and 10, 100, 1000 are evenly spaced.
* A checkpoint whose model collapsed has no score (``value`` is NaN). It is drawn as
  a red cross at y = 0 so it cannot be read as a measured score of 0, nor silently
  disappear from the line.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import altair as alt
import pandas as pd

# The instruments' charts (paired changes, health) are in :mod:`editkit.viz_instruments`.
__all__ = ["CHANCE_LEVELS", "NON_SCORE_METRICS", "curves", "score_curves", "edit_quality_curves", "save_chart"]

# Accuracy of uniform guessing, by task. MMLU has four options in both the cloze
# (likelihood) and the lettered (generation) formats; GSM8K has no chance level.
# TruthfulQA: the mean over the 817 packaged questions of 1/choices (MC1) and of the
# share of true answers among the choices (MC2, the probability mass a uniform model
# puts on them); tests/test_viz.py recomputes both from the data.
CHANCE_LEVELS: dict[str, float] = {
    "mmlu": 0.25,
    "mmlu_cloze": 0.25,
    "commonsenseqa": 0.2,
    "commonsense_qa": 0.2,
    "commonsense_qa_cloze": 0.2,
    "commonsense_qa_gen": 0.2,
    "truthfulqa_mc1": 0.2261,
    "truthfulqa_mc2": 0.4484,
    "toxigen": 0.5,
}

# Metrics that are rates of failure rather than scores: no chance level applies.
NON_SCORE_METRICS = frozenset({"unusable_rate", "format_failure_rate", "nonfinite_rate", "constant_answer_share"})

# editkit.edit_metrics.CONVENTIONS, in display order (not imported: that module loads torch).
_CONVENTION_ORDER = ("prob", "token", "gen")

_COLLAPSE_COLOR = "#d62728"
_PANEL_WIDTH = 220
_PANEL_HEIGHT = 160


def _x_axis(n_edits: Iterable[int], title: str = "number of sequential edits") -> alt.X:
    # Symlog rather than log: log(0) is undefined and the unedited model is the baseline
    # every later checkpoint is read against. constant=1 makes the scale linear on [0, 1].
    ticks = sorted({int(n) for n in n_edits})
    return alt.X(
        "n_edits:Q",
        title=title,
        scale=alt.Scale(type="symlog", constant=1),
        axis=alt.Axis(values=ticks, format="d", labelOverlap=True),
    )


def _color(field: str, domain: Sequence[str], title: str) -> alt.Color:
    # An explicit domain keeps a method's colour the same in every panel and chart.
    # Opaque legend symbols: the first layer is the translucent CI band, whose opacity
    # the legend would otherwise copy.
    return alt.Color(
        f"{field}:N",
        title=title,
        scale=alt.Scale(domain=list(domain)),
        legend=alt.Legend(symbolOpacity=1, symbolType="circle"),
    )


def _band_opacity(n_runs: int, single: float) -> float:
    # Overlapping CI bands of many runs turn to mud: fainter the more runs share a panel.
    return single if n_runs <= 1 else max(0.04, min(single, 0.3 / n_runs))


def _ordered(values: Iterable[str], preferred: Sequence[str] | None = None) -> list[str]:
    seen = list(dict.fromkeys(values))
    if preferred is None:
        return seen
    return [v for v in preferred if v in seen] + [v for v in seen if v not in preferred]


def _x_encoding(frame: pd.DataFrame, x: str, title: str | None) -> alt.X:
    if x == "n_edits":
        return _x_axis(frame["n_edits"], title or "number of sequential edits")
    # Model sizes and other positive quantities span orders of magnitude: log scale.
    positive = pd.to_numeric(frame[x], errors="coerce").dropna()
    scale = alt.Scale(type="log") if len(positive) and (positive > 0).all() else alt.Scale()
    return alt.X(f"{x}:Q", title=title or x.replace("_", " "), scale=scale)


def curves(
    frame: pd.DataFrame,
    *,
    x: str = "n_edits",
    color: str = "method",
    facet: str | None = None,
    row: str | None = None,
    column: str | None = None,
    dash: str | None = None,
    detail: str = "run_id",
    y_title: str = "score",
    y_domain: Sequence[float] | None = None,
    x_title: str | None = None,
    color_order: Sequence[str] | None = None,
    color_title: str | None = None,
    facet_order: Sequence[str] | None = None,
    row_order: Sequence[str] | None = None,
    column_order: Sequence[str] | None = None,
    columns: int = 3,
    band_opacity: float = 0.18,
    title: str = "",
    subtitle: str = "",
    tooltip: Sequence[str] = (),
    rule_title: str = "chance",
) -> alt.FacetChart:
    """The one chart builder: lines of ``value`` against ``x`` with 95% CI bands, faceted.

    Every chart of the study is this builder with other axis choices: scores against
    the number of edits coloured by method (RQ1), by model for instruct against base
    (RQ2), the drop against model size (RQ3), one panel per capability (RQ4).

    Args:
        frame: tidy rows with ``value``, optionally ``ci_low``/``ci_high`` (the band),
            ``collapsed`` with ``collapse_y`` (a red cross instead of a score) and
            ``chance`` (a dashed rule per panel, named ``rule_title`` on hover), and
            the columns named below.
        x: quantitative column for the x axis. ``n_edits`` gets the symlog axis of
            the study's checkpoints; another positive column (``n_params``) a log axis.
        color: nominal column for colour (one line per value and ``detail``).
        facet: one panel per value of this column, wrapped at ``columns``; or
        row, column: a grid of panels by these two columns (instead of ``facet``).
        dash: nominal column for the stroke dash (e.g. ``model`` when colour is the method).
        detail: column that separates lines of the same colour (a run).
        y_title, y_domain, x_title: axis titles and a fixed y range.
        color_order, facet_order, row_order, column_order: value orders (default: as they appear).
        color_title: legend title (default: the colour column's name).
        band_opacity: opacity of one run's CI band; fainter when many runs share a panel.
        title, subtitle: the chart's title.
        tooltip: extra columns shown on hover.

    Raises:
        ValueError: no rows, or a named column is missing.
    """
    if frame.empty:
        raise ValueError("no rows to draw")
    named = [c for c in (x, color, facet, row, column, dash, detail) if c is not None]
    missing = [c for c in named if c not in frame.columns]
    if missing:
        raise ValueError(f"columns {missing} are not in the frame (it has {list(frame.columns)})")
    frame = frame.copy()
    for flag, fill in (("collapsed", False), ("collapse_y", float("nan")), ("chance", float("nan"))):
        if flag not in frame:
            frame[flag] = fill
    color_domain = list(color_order) if color_order is not None else sorted(frame[color].astype(str).unique())
    color_encoding = _color(color, color_domain, color_title or color.replace("_", " "))
    series: dict[str, object] = {"detail": f"{detail}:N"}
    if dash is not None:
        series["strokeDash"] = alt.StrokeDash(f"{dash}:N", title=dash.replace("_", " "))
    y_scale = alt.Scale(domain=list(y_domain)) if y_domain is not None else alt.Undefined
    y = alt.Y("value:Q", title=y_title, scale=y_scale)
    hover = [alt.Tooltip(f"{c}:N") for c in dict.fromkeys([c for c in ("model", "method", color, dash) if c
                                                                   and c in frame])]
    hover += [alt.Tooltip(f"{x}:Q"), alt.Tooltip("value:Q", format=".4f")]
    hover += [alt.Tooltip(f"{c}:Q", format=".4f", title=f"95% CI {c[3:]}") for c in ("ci_low", "ci_high") if c in frame]
    hover += [alt.Tooltip(f"{c}") for c in tooltip if c in frame]
    base = alt.Chart().encode(x=_x_encoding(frame, x, x_title))
    layers = []
    if "ci_low" in frame and "ci_high" in frame:
        layers.append(
            base.transform_filter("isValid(datum.ci_low) && isValid(datum.ci_high) && !datum.collapsed")
            .mark_area(opacity=_band_opacity(frame[detail].nunique(), band_opacity))
            .encode(y=alt.Y("ci_low:Q", title=y_title, scale=y_scale), y2="ci_high:Q", color=color_encoding,
                    **series))
    scored = base.transform_filter("isValid(datum.value) && !datum.collapsed")
    layers.append(scored.mark_line(strokeWidth=1.8).encode(y=y, color=color_encoding, **series))
    layers.append(scored.mark_point(filled=True, size=36).encode(y=y, color=color_encoding, tooltip=hover))
    if frame["collapsed"].any():
        # Fixed red rather than the series colour: a collapse must stand out from every line.
        layers.append(
            base.transform_filter("datum.collapsed")
            .mark_point(shape="cross", filled=True, size=140, color=_COLLAPSE_COLOR, opacity=1)
            .encode(y=alt.Y("collapse_y:Q", title=y_title), tooltip=hover))
    if frame["chance"].notna().any():
        # One rule per panel; mean() collapses the identical per-row levels to one value.
        layers.append(
            alt.Chart().transform_filter("isValid(datum.chance)")
            .mark_rule(strokeDash=[5, 4], color="gray", opacity=0.8)
            .encode(y=alt.Y("mean(chance):Q", title=y_title),
                    tooltip=[alt.Tooltip("mean(chance):Q", title=rule_title)]))
    layered = alt.layer(*layers, data=frame).properties(width=_PANEL_WIDTH, height=_PANEL_HEIGHT)
    chart = _facet(layered, frame, facet, facet_order, columns, row, row_order, column, column_order)
    return chart.properties(title=alt.TitleParams(title, subtitle=subtitle) if subtitle else title)


def _facet(layered: alt.LayerChart, frame: pd.DataFrame, facet: str | None, facet_order: Sequence[str] | None,
           columns: int, row: str | None, row_order: Sequence[str] | None, column: str | None,
           column_order: Sequence[str] | None) -> alt.TopLevelMixin:
    """Panels by one wrapped column (``facet``), or a grid by ``row`` and ``column``, or none."""
    def order(name: str, given: Sequence[str] | None) -> list[str]:
        return list(given or _ordered(frame[name].astype(str)))

    if facet is not None:
        return layered.facet(facet=alt.Facet(f"{facet}:N", title=None, sort=order(facet, facet_order),
                                             header=alt.Header(labelFontWeight="bold")), columns=columns)
    facets = {}
    if row is not None:
        facets["row"] = alt.Row(f"{row}:N", title=None if row == "metric" else row, sort=order(row, row_order))
    if column is not None:
        facets["column"] = alt.Column(f"{column}:N", title=column, sort=order(column, column_order))
    return layered.facet(**facets) if facets else layered


def score_curves(
    scores: pd.DataFrame,
    tasks: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    chance: Mapping[str, float] | None = None,
    columns: int = 3,
    *,
    x: str = "n_edits",
    color: str = "method",
    dash: str | None = None,
) -> alt.FacetChart:
    """Benchmark score against the number of edits, one panel per (task, metric).

    Args:
        scores: ``Results.scores`` (run_id, model, method, n_edits, task, metric,
            value, ci_low, ci_high, n, status; any grid axes).
        tasks: tasks to draw, in panel order. Default: every task except the
            per-subject ``"mmlu/<subject>"`` breakdowns.
        metrics: metrics to draw, in panel order. Default: all present, except
            failure rates (:data:`NON_SCORE_METRICS`) that are 0 at every
            checkpoint of every run, such as format failures of a likelihood-scored
            task: a flat line at 0 is said once in the subtitle instead.
        chance: chance level by task (default :data:`CHANCE_LEVELS`), drawn as a dashed
            rule in every panel of that task except failure-rate metrics.
        columns: panels per row.
        x, color, dash: axis choices of :func:`curves`. By default colour is the
            method, dashed by model when there are several.

    Returns:
        A faceted chart: 95% CI band under line and points; collapsed checkpoints as
        red crosses at 0.
    """
    chance = CHANCE_LEVELS if chance is None else chance
    frame = scores.copy()
    if tasks is None:
        frame = frame[~frame["task"].astype(str).str.contains("/")]
    else:
        frame = frame[frame["task"].isin(tasks)]
    never_failed: list[str] = []
    if metrics is not None:
        frame = frame[frame["metric"].isin(metrics)]
    else:
        failure = frame["metric"].isin(NON_SCORE_METRICS)
        values = frame[failure].groupby(["task", "metric"])["value"]
        flat = {key for key, v in values if v.notna().any() and (v.dropna() == 0).all()}
        never_failed = sorted({metric for _, metric in flat})
        frame = frame[[(t, m) not in flat for t, m in zip(frame["task"], frame["metric"])]]
    if frame.empty:
        raise ValueError(f"no score rows to draw for tasks={tasks!r} metrics={metrics!r}")

    task_order = _ordered(frame["task"], tasks)
    metric_order = _ordered(frame["metric"], metrics)
    frame["panel"] = frame["task"] + " · " + frame["metric"]
    panel_order = [f"{t} · {m}" for t in task_order for m in metric_order]
    panel_order = [p for p in panel_order if p in set(frame["panel"])]
    status = frame["status"] if "status" in frame else pd.Series("ok", index=frame.index)
    frame["collapsed"] = status.eq("collapsed")
    frame["collapse_y"] = [0.0 if c else float("nan") for c in frame["collapsed"]]
    frame["chance"] = [
        float("nan") if m in NON_SCORE_METRICS else chance.get(t, float("nan"))
        for t, m in zip(frame["task"], frame["metric"])
    ]
    frame = frame.sort_values(["panel", "run_id", x]).reset_index(drop=True)
    if dash is None and color != "model" and frame["model"].nunique() > 1:
        dash = "model"
    chart = curves(frame, x=x, color=color, dash=dash, facet="panel", facet_order=panel_order, columns=columns,
                   y_title="score", tooltip=("task", "metric", "n", "status"),
                   title="General abilities vs number of sequential edits" if x == "n_edits" else f"Scores vs {x}",
                   subtitle="band: 95% CI · dashed: chance level · red ✕: collapsed checkpoint (no score)"
                   + (f" · {', '.join(never_failed)}: 0 throughout, not drawn" if never_failed else ""))
    # GSM8K on a small model sits near 0 while MMLU sits near 0.25+: shared y hides one.
    return chart.resolve_scale(y="independent")


def edit_quality_curves(edit_quality: pd.DataFrame, convention: str | None = None) -> alt.FacetChart:
    """Reliability, generalisation and locality against the number of edits.

    Two layouts, chosen by how many runs are drawn:

    * **One run** (one method on one model): colour is the metric; rows are the
      scope (``latest`` = the edits of the last step, ``retention`` = every edit
      so far) and columns the scoring convention (``prob`` = P(new) > P(true),
      ``token`` = teacher-forced token accuracy, ``gen`` = the greedy
      generation contains the target; see :mod:`editkit.edit_metrics`).
    * **Several runs**: colour is the method (``model · method`` when several
      models are drawn), so curves of ten editors stay apart; rows are the
      metric and columns the scope, for one convention.

    Args:
        edit_quality: ``Results.edit_quality`` (run_id, model, method, n_edits,
            scope, metric, convention, value, ci_low, ci_high, n).
        convention: draw only this convention. Default: every one for one run,
            ``"prob"`` (the study's) for several.

    Raises:
        ValueError: no rows, or ``convention`` is not in them.
    """
    if edit_quality.empty:
        raise ValueError("no edit-quality rows to draw")
    frame = edit_quality[
        ["run_id", "model", "method", "n_edits", "scope", "metric", "convention", "value", "ci_low", "ci_high", "n"]
    ].copy()
    several_models = frame["model"].nunique() > 1
    several_runs = frame["run_id"].nunique() > 1
    if convention is None and several_runs:
        convention = "prob"
    if convention is not None:
        if convention not in set(frame["convention"]):
            raise ValueError(f"convention {convention!r} not among {sorted(set(frame['convention']))}")
        frame = frame[frame["convention"] == convention]
    frame["series"] = frame["model"] + " · " + frame["method"] if several_models else frame["method"]
    frame = frame.sort_values(["scope", "convention", "run_id", "metric", "n_edits"]).reset_index(drop=True)
    metrics = _ordered(frame["metric"], ["reliability", "generalization", "locality"])
    options: dict[str, object]
    if several_runs:
        options = {"color": "series", "color_order": sorted(frame["series"].unique()), "row": "metric",
                   "color_title": "model · method" if several_models else "method",
                   "row_order": metrics, "column": "scope", "column_order": ["latest", "retention"]}
        subtitle = (f"{convention} convention · latest: the edits of the last step · "
                    "retention: every edit so far · band: 95% CI")
    else:
        options = {"color": "metric", "color_order": metrics, "row": "scope", "row_order": ["latest", "retention"],
                   "column": "convention", "column_order": _ordered(frame["convention"], _CONVENTION_ORDER)}
        subtitle = "latest: the edits of the last step · retention: every edit so far · band: 95% CI"
    return curves(frame, y_title="rate", y_domain=(0, 1), band_opacity=0.15, tooltip=("scope", "convention", "n"),
                  title="Edit quality vs number of sequential edits", subtitle=subtitle, **options)


def save_chart(chart: alt.TopLevelMixin, path_stem: str | Path, scale_factor: float = 2.0) -> list[Path]:
    """Write ``<path_stem>.html`` (interactive) and ``<path_stem>.png`` (via vl-convert).

    Parent folders are created. Returns the paths written, html first.
    """
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    html = stem.with_name(stem.name + ".html")
    png = stem.with_name(stem.name + ".png")
    chart.save(html, format="html")
    chart.save(png, format="png", scale_factor=scale_factor)
    return [html, png]

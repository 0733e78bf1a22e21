"""Altair chart builders over the tidy frames of :class:`editkit.runs.StudyResult`.

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

__all__ = ["CHANCE_LEVELS", "NON_SCORE_METRICS", "score_curves", "edit_quality_curves", "save_chart"]

# Accuracy of uniform guessing, by task. MMLU has four options in both the cloze
# (likelihood) and the lettered (generation) formats; GSM8K has no chance level.
CHANCE_LEVELS: dict[str, float] = {
    "mmlu": 0.25,
    "mmlu_cloze": 0.25,
    "commonsenseqa": 0.2,
    "toxigen": 0.5,
}

# Metrics that are rates of failure rather than scores: no chance level applies.
NON_SCORE_METRICS = frozenset({"unusable_rate", "format_failure_rate", "nonfinite_rate", "constant_answer_share"})

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


def score_curves(
    scores: pd.DataFrame,
    tasks: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    chance: Mapping[str, float] | None = None,
    columns: int = 3,
) -> alt.FacetChart:
    """Benchmark score against the number of edits, one panel per (task, metric).

    Args:
        scores: ``StudyResult.scores`` (run_id, model, method, n_edits, task, metric,
            value, ci_low, ci_high, n, status).
        tasks: tasks to draw, in panel order. Default: every task except the
            per-subject ``"mmlu/<subject>"`` breakdowns.
        metrics: metrics to draw, in panel order. Default: all present, except
            failure rates (:data:`NON_SCORE_METRICS`) that are 0 at every
            checkpoint of every run, such as format failures of a likelihood-scored
            task: a flat line at 0 is said once in the subtitle instead.
        chance: chance level by task (default :data:`CHANCE_LEVELS`), drawn as a dashed
            rule in every panel of that task except failure-rate metrics.
        columns: panels per row.

    Returns:
        A faceted chart: 95% CI band under line and points, coloured by method (dashed
        by model when there are several); collapsed checkpoints as red crosses at 0.
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

    collapsed = frame["status"].eq("collapsed")
    frame["collapsed"] = collapsed
    frame["collapse_y"] = 0.0
    frame.loc[~collapsed, "collapse_y"] = float("nan")
    frame["chance"] = [
        float("nan") if m in NON_SCORE_METRICS else chance.get(t, float("nan"))
        for t, m in zip(frame["task"], frame["metric"])
    ]
    columns_kept = ["run_id", "model", "method", "n_edits", "task", "metric", "panel", "value",
                    "ci_low", "ci_high", "n", "status", "collapsed", "collapse_y", "chance"]
    frame = frame[columns_kept].sort_values(["panel", "run_id", "n_edits"]).reset_index(drop=True)

    methods = sorted(frame["method"].unique())
    several_models = frame["model"].nunique() > 1
    x = _x_axis(frame["n_edits"])
    color = _color("method", methods, "method")
    series = {"detail": "run_id:N"}
    if several_models:
        series["strokeDash"] = alt.StrokeDash("model:N", title="model")
    tooltip = [
        alt.Tooltip("model:N"), alt.Tooltip("method:N"), alt.Tooltip("n_edits:Q", title="edits"),
        alt.Tooltip("task:N"), alt.Tooltip("metric:N"), alt.Tooltip("value:Q", format=".4f"),
        alt.Tooltip("ci_low:Q", format=".4f", title="95% CI low"),
        alt.Tooltip("ci_high:Q", format=".4f", title="95% CI high"),
        alt.Tooltip("n:Q", title="items"), alt.Tooltip("status:N"),
    ]

    base = alt.Chart().encode(x=x)
    scored = base.transform_filter("isValid(datum.value) && !datum.collapsed")
    band = (
        base.transform_filter("isValid(datum.ci_low) && isValid(datum.ci_high) && !datum.collapsed")
        .mark_area(opacity=_band_opacity(frame["run_id"].nunique(), 0.18))
        .encode(y=alt.Y("ci_low:Q", title="score"), y2="ci_high:Q", color=color, **series)
    )
    line = scored.mark_line(strokeWidth=1.8).encode(y=alt.Y("value:Q", title="score"), color=color, **series)
    points = scored.mark_point(filled=True, size=36).encode(
        y=alt.Y("value:Q", title="score"), color=color, tooltip=tooltip
    )
    # Fixed red rather than the method colour: a collapse must stand out from every line.
    collapse = (
        base.transform_filter("datum.collapsed")
        .mark_point(shape="cross", filled=True, size=140, color=_COLLAPSE_COLOR, opacity=1)
        .encode(y=alt.Y("collapse_y:Q", title="score"), tooltip=tooltip)
    )
    # One rule per panel; mean() collapses the identical per-row levels to one value.
    chance_rule = (
        alt.Chart()
        .transform_filter("isValid(datum.chance)")
        .mark_rule(strokeDash=[5, 4], color="gray", opacity=0.8)
        .encode(y=alt.Y("mean(chance):Q", title="score"), tooltip=[alt.Tooltip("mean(chance):Q", title="chance")])
    )
    layered = alt.layer(band, line, points, collapse, chance_rule, data=frame).properties(
        width=_PANEL_WIDTH, height=_PANEL_HEIGHT
    )
    return (
        layered.facet(
            facet=alt.Facet("panel:N", title=None, sort=panel_order, header=alt.Header(labelFontWeight="bold")),
            columns=columns,
        )
        # GSM8K on a small model sits near 0 while MMLU sits near 0.25+: shared y hides one.
        .resolve_scale(y="independent")
        .properties(
            title=alt.TitleParams(
                "General abilities vs number of sequential edits",
                subtitle="band: 95% CI · dashed: chance level · red ✕: collapsed checkpoint (no score)"
                + (f" · {', '.join(never_failed)}: 0 throughout, not drawn" if never_failed else ""),
            )
        )
    )


def edit_quality_curves(edit_quality: pd.DataFrame, convention: str | None = None) -> alt.FacetChart:
    """Reliability, generalisation and locality against the number of edits.

    Two layouts, chosen by how many runs are drawn:

    * **One run** (one method on one model): colour is the metric; rows are the
      scope (``latest`` = the edits of the last step, ``retention`` = every edit
      so far) and columns the scoring convention (``prob`` = P(new) > P(true),
      ``token`` = teacher-forced token accuracy).
    * **Several runs**: colour is the method (``model · method`` when several
      models are drawn), so curves of ten editors stay apart; rows are the
      metric and columns the scope, for one convention.

    Args:
        edit_quality: ``StudyResult.edit_quality`` (run_id, model, method, n_edits,
            scope, metric, convention, value, ci_low, ci_high, n).
        convention: draw only this convention. Default: both for one run,
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
    if several_runs:
        color = _color("series", sorted(frame["series"].unique()), "model · method" if several_models else "method")
        facets = {"row": alt.Row("metric:N", title=None, sort=metrics),
                  "column": alt.Column("scope:N", title="scope", sort=["latest", "retention"])}
        subtitle = (f"{convention} convention · latest: the edits of the last step · "
                    "retention: every edit so far · band: 95% CI")
    else:
        color = _color("metric", metrics, "metric")
        facets = {"row": alt.Row("scope:N", title="scope", sort=["latest", "retention"]),
                  "column": alt.Column("convention:N", title="convention", sort=["prob", "token"])}
        subtitle = "latest: the edits of the last step · retention: every edit so far · band: 95% CI"
    x = _x_axis(frame["n_edits"])
    series = {"detail": "run_id:N"}
    y = alt.Y("value:Q", title="rate", scale=alt.Scale(domain=[0, 1]))
    tooltip = [
        alt.Tooltip("model:N"), alt.Tooltip("method:N"), alt.Tooltip("n_edits:Q", title="edits"),
        alt.Tooltip("scope:N"), alt.Tooltip("convention:N"), alt.Tooltip("metric:N"),
        alt.Tooltip("value:Q", format=".3f"), alt.Tooltip("ci_low:Q", format=".3f", title="95% CI low"),
        alt.Tooltip("ci_high:Q", format=".3f", title="95% CI high"), alt.Tooltip("n:Q", title="items"),
    ]
    base = alt.Chart().encode(x=x)
    band = (
        base.transform_filter("isValid(datum.ci_low) && isValid(datum.ci_high)")
        .mark_area(opacity=_band_opacity(frame["run_id"].nunique(), 0.15))
        .encode(y=alt.Y("ci_low:Q", title="rate", scale=alt.Scale(domain=[0, 1])), y2="ci_high:Q",
                color=color, **series)
    )
    valid = base.transform_filter("isValid(datum.value)")
    line = valid.mark_line(strokeWidth=1.8).encode(y=y, color=color, **series)
    points = valid.mark_point(filled=True, size=36).encode(y=y, color=color, tooltip=tooltip)
    layered = alt.layer(band, line, points, data=frame).properties(width=_PANEL_WIDTH, height=_PANEL_HEIGHT)
    return layered.facet(**facets).properties(
        title=alt.TitleParams("Edit quality vs number of sequential edits", subtitle=subtitle)
    )


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

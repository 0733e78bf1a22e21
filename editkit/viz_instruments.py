"""Charts of the instruments that see damage: paired changes and model health.

Both use the one chart builder, :func:`editkit.viz.curves`, with its symlog axis of
the number of edits:

* :func:`delta_curves`: the paired change of every task against the unedited model on
  the same items (:attr:`editkit.results.Results.deltas`), with its paired interval.
* :func:`health_curves`: held-out perplexity relative to the unedited model (log
  scale, with its paired interval), the largest relative norm growth of an edited
  matrix and its condition number (:attr:`editkit.results.Results.health`).
"""

from __future__ import annotations

from collections.abc import Sequence

import altair as alt
import numpy as np
import pandas as pd

from .viz import _ordered, curves

__all__ = ["delta_curves", "health_curves", "HEALTH_PANELS"]

_DELTA_TITLES = {"acc": "Δ accuracy", "loglik": "Δ log-likelihood of the gold answer",
                 "prob": "Δ probability share of the gold answer"}


def delta_curves(deltas: pd.DataFrame, metric: str = "acc", tasks: Sequence[str] | None = None, columns: int = 3,
                 *, color: str = "method", dash: str | None = None) -> alt.FacetChart:
    """Paired change against the unedited model vs the number of edits, one panel per task.

    Args:
        deltas: ``Results.deltas`` (:func:`editkit.paired.deltas`).
        metric: ``"acc"``, ``"loglik"`` or ``"prob"``.
        tasks: tasks to draw, in panel order (default: all).
        columns: panels per row.
        color, dash: as in :func:`curves`; dashed by model when there are several.

    Returns:
        Lines of the mean change with its 95% paired bootstrap interval as a band and a
        dashed rule at 0 (no change) in every panel.

    Raises:
        ValueError: no rows of ``metric`` (and ``tasks``) to draw.
    """
    frame = deltas[deltas["metric"] == metric]
    if tasks is not None:
        frame = frame[frame["task"].isin(tasks)]
    if frame.empty:
        raise ValueError(f"no delta rows to draw for metric={metric!r} tasks={tasks!r}")
    # Each line starts at the unedited model, whose change is 0 by definition.
    start = frame.drop_duplicates(["run_id", "task"]).assign(n_edits=0, delta=0.0, ci_low=0.0, ci_high=0.0,
                                                             p_value=float("nan"))
    frame = pd.concat([start, frame], ignore_index=True)
    frame = frame.rename(columns={"delta": "value"}).assign(chance=0.0)  # the rule: no change
    frame = frame.sort_values(["task", "run_id", "n_edits"]).reset_index(drop=True)
    if dash is None and color != "model" and frame["model"].nunique() > 1:
        dash = "model"
    chart = curves(frame, color=color, dash=dash, facet="task", facet_order=_ordered(frame["task"], tasks),
                   columns=columns, y_title=_DELTA_TITLES.get(metric, f"Δ {metric}"), rule_title="no change",
                   tooltip=("task", "metric", "p_value", "n_items", "n_excluded"),
                   title="Change against the unedited model, on the same items",
                   subtitle="band: 95% paired bootstrap CI · dashed: no change")
    return chart.resolve_scale(y="independent")


# metric -> (panel title, drawn as log10)
HEALTH_PANELS: dict[str, tuple[str, bool]] = {
    "heldout_ppl_ratio": ("log10 held-out perplexity ÷ unedited", True),
    "max_rel_norm_growth": ("largest ‖W − W₀‖ / ‖W₀‖ of an edited matrix", False),
    "max_condition_number": ("log10 largest condition number of an edited matrix", True),
}


def health_curves(health: pd.DataFrame, metrics: Sequence[str] | None = None, columns: int = 3, *,
                  color: str = "method", dash: str | None = None) -> alt.FacetChart:
    """Model health against the number of edits, one panel per health metric.

    Args:
        health: ``Results.health`` (run_id, model, method, n_edits, metric, value,
            parameter, ci_low, ci_high); only the summary rows (no ``parameter``) are drawn.
        metrics: keys of :data:`HEALTH_PANELS` to draw, in order (default: all present).
        columns: panels per row.
        color, dash: as in :func:`editkit.viz.curves`; dashed by model when there are several.

    Returns:
        Lines with 95% bands where the metric has an interval (the perplexity ratio is
        paired with the unedited model on the same texts). Log panels have a dashed rule
        at 0 (no change). A perplexity that is not finite is a red cross at 0 (a model
        whose outputs are NaN or inf), never a point on the line.

    Raises:
        ValueError: no summary rows of the chosen metrics.
    """
    wanted = list(metrics) if metrics is not None else list(HEALTH_PANELS)
    unknown = [m for m in wanted if m not in HEALTH_PANELS]
    if unknown:
        raise ValueError(f"unknown health metrics {unknown} (known: {', '.join(HEALTH_PANELS)})")
    frame = health[health["parameter"].isna() & health["metric"].isin(wanted)].drop(columns=["parameter"])
    if frame.empty:
        raise ValueError(f"no health rows to draw for metrics={wanted}")
    for column in ("ci_low", "ci_high"):
        if column not in frame:
            frame[column] = np.nan
    logged = frame["metric"].map(lambda m: HEALTH_PANELS[m][1]).astype(bool)
    broken = ~np.isfinite(frame["value"].astype(float))
    with np.errstate(divide="ignore", invalid="ignore"):
        for column in ("value", "ci_low", "ci_high"):
            values = frame[column].astype(float)
            frame[column] = np.where(logged, np.log10(values), values)
    frame.loc[broken, ["value", "ci_low", "ci_high"]] = np.nan
    frame["collapsed"] = broken & frame["metric"].eq("heldout_ppl_ratio")
    frame["collapse_y"] = np.where(frame["collapsed"], 0.0, np.nan)
    frame["chance"] = np.where(logged, 0.0, np.nan)
    frame["panel"] = frame["metric"].map(lambda m: HEALTH_PANELS[m][0])
    order = [HEALTH_PANELS[m][0] for m in _ordered(frame["metric"], wanted)]
    frame = frame.sort_values(["panel", "run_id", "n_edits"]).reset_index(drop=True)
    if dash is None and color != "model" and frame["model"].nunique() > 1:
        dash = "model"
    chart = curves(frame, color=color, dash=dash, facet="panel", facet_order=order, columns=columns,
                   y_title="value", rule_title="unedited", tooltip=("metric", "n_edits"),
                   title="Model health vs number of sequential edits",
                   subtitle="band: 95% paired bootstrap CI over held-out texts · dashed: unedited · "
                            "red ✕: non-finite perplexity")
    return chart.resolve_scale(y="independent")

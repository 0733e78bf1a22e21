"""Charts of the statistics of research questions 2-5 (:mod:`editkit.findings`).

* :func:`rate_chart`: each run's rate of decline (RQ2), a point with its 95% interval
  per model, coloured by method, one panel per task.
* :func:`scale_chart`: the paired drop at a fixed number of edits against the model's
  parameter count on a log axis (RQ3), through the one line builder
  :func:`editkit.viz.curves`.
* :func:`safety_chart`: TruthfulQA and ToxiGen scores and, under each, the share of
  items given the most common answer (RQ5), through :func:`editkit.viz.curves`.

RQ4's heatmap is :func:`editkit.findings.capability_heatmap`.
"""

from __future__ import annotations

import altair as alt
import pandas as pd

from .viz import curves

__all__ = ["rate_chart", "safety_chart", "scale_chart"]


def rate_chart(rates: pd.DataFrame, *, value: str = "rate") -> alt.FacetChart:
    """Dot-and-whisker chart of :func:`editkit.findings.decline_rate` per model, one panel per task.

    Args:
        rates: the frame of :func:`~editkit.findings.decline_rate` (``model``, ``method``,
            ``task``, ``rate``, ``ci_low``, ``ci_high``; ``area``/``final_drop`` with
            their ``<name>_ci_low``/``_ci_high``).
        value: ``"rate"``, ``"area"`` or ``"final_drop"``.

    Raises:
        ValueError: no rows, or an unknown ``value``.
    """
    bounds = {"rate": ("ci_low", "ci_high"), "area": ("area_ci_low", "area_ci_high"),
              "final_drop": ("final_ci_low", "final_ci_high")}
    if value not in bounds:
        raise ValueError(f"value must be one of {sorted(bounds)}, got {value!r}")
    if rates.empty:
        raise ValueError("no decline rates to draw")
    low, high = bounds[value]
    data = rates.drop(columns=["replicates"], errors="ignore").rename(columns={value: "value", low: "low",
                                                                             high: "high"})
    data = data[["model", "method", "task", "value", "low", "high", "value0", "n_items", "note"]]
    title = {"rate": "rate of decline (share of the unedited margin over chance lost, averaged over log N)",
             "area": "average drop over log N", "final_drop": "share of the margin lost at the last checkpoint"}
    base = alt.Chart().encode(y=alt.Y("model:N", title=None),
                              color=alt.Color("method:N", title="method"),
                              yOffset=alt.YOffset("method:N"))
    whiskers = base.mark_rule(strokeWidth=2).encode(x=alt.X("low:Q", title=title[value]), x2="high:Q")
    points = base.mark_point(filled=True, size=60).encode(
        x="value:Q", tooltip=["model", "method", "task", alt.Tooltip("value:Q", format=".3f"),
                              alt.Tooltip("low:Q", format=".3f"), alt.Tooltip("high:Q", format=".3f"),
                              alt.Tooltip("value0:Q", format=".3f", title="unedited score"), "n_items", "note"])
    zero = alt.Chart().mark_rule(strokeDash=[5, 4], color="gray").encode(x=alt.datum(0))
    layered = alt.layer(whiskers, points, zero, data=data).properties(width=320,
                                                                      height=34 * data["model"].nunique())
    return layered.facet(facet=alt.Facet("task:N", title=None), columns=2)


def scale_chart(drops: pd.DataFrame) -> alt.FacetChart:
    """The paired drop against the parameter count (log axis), one line per method, one panel per task.

    Args:
        drops: the frame of :func:`editkit.findings.drop_vs_scale` (several tasks may be
            concatenated); models without ``n_params`` are left out.

    Raises:
        ValueError: no row with a parameter count.
    """
    data = drops[pd.to_numeric(drops["n_params"], errors="coerce").gt(0)]
    if data.empty:
        raise ValueError("no drops with a parameter count to draw")
    n_edits = sorted(set(int(n) for n in data["n_edits"]))
    data = data.assign(value=data["drop"], n_params=data["n_params"].astype(float), series=data["method"], chance=0.0)
    return curves(data, x="n_params", color="method", detail="series", facet="task", x_title="parameters (log)",
                  y_title=f"drop after {', '.join(map(str, n_edits))} edits (positive: worse)",
                  tooltip=["model", "n_items", "p_value", "note"], rule_title="no change")


def safety_chart(table: pd.DataFrame) -> alt.FacetChart:
    """Safety scores (top row) and constant-answer shares (bottom row) against the number of edits.

    A score whose constant-answer share is near 1 measures the benchmark's label balance,
    not the model; the two rows put each score above the share that qualifies it.

    Args:
        table: the frame of :func:`editkit.findings.safety_table`.

    Raises:
        ValueError: no rows.
    """
    if table.empty:
        raise ValueError("no safety scores to draw")
    panel = table["task"] + " · " + table["metric"]
    scores = table.assign(panel=panel, quantity="score", collapsed=table["status"] == "collapsed", collapse_y=0.0)
    shares = table.assign(panel=panel, quantity="constant-answer share", value=table["constant_answer_share"],
                          ci_low=table["share_ci_low"], ci_high=table["share_ci_high"], chance=float("nan"),
                          collapsed=False)
    frame = pd.concat([scores, shares], ignore_index=True)
    columns = ["run_id", "model", "method", "n_edits", "panel", "quantity", "value", "ci_low", "ci_high", "chance",
               "collapsed", "collapse_y", "constant_answer"]
    return curves(frame[columns], row="quantity", column="panel", row_order=["score", "constant-answer share"],
                  y_domain=[0, 1], y_title="value", dash="model" if frame["model"].nunique() > 1 else None,
                  tooltip=["constant_answer"])

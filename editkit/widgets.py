"""ipywidgets explorers over saved study results.

Widgets are views: everything they show is computed by the table functions below
from the frames of a :class:`~editkit.results.Results`, which :func:`editkit.results.load_results`
reads from files. Nothing here runs a model or holds a result that is not on disk,
so a notebook executed headless (where widget callbacks never fire) loses no result.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets
import pandas as pd

if TYPE_CHECKING:  # the explorer only needs the frames
    from .results import Results

__all__ = [
    "CheckpointExplorer",
    "checkpoint_explorer",
    "scores_at",
    "edit_quality_at",
    "generations_at",
    "run_label",
]

_METRIC_ORDER = ("reliability", "generalization", "locality")
# editkit.edit_metrics.CONVENTIONS (not imported: that module loads torch).
_CONVENTION_ORDER = ("prob", "token", "gen")


def run_label(checkpoints: pd.DataFrame, run_id: str) -> str:
    """A short label for one run: its method, plus model and run id where needed to disambiguate."""
    runs = checkpoints[["run_id", "model", "method"]].drop_duplicates()
    row = runs[runs["run_id"] == run_id].iloc[0]
    label = str(row["method"])
    if runs["model"].nunique() > 1:
        label = f"{row['model']} · {label}"
    same = runs[(runs["method"] == row["method"]) & (runs["model"] == row["model"])]
    if len(same) > 1:
        label = f"{label} ({run_id})"
    return label


def scores_at(scores: pd.DataFrame, run_id: str, n_edits: int, subjects: bool = False) -> pd.DataFrame:
    """Per-benchmark scores of one run at ``n_edits`` next to the unedited model (0 edits).

    Returns one row per (task, metric) with columns ``task, metric, unedited, edited,
    ci_low, ci_high, change, n, status``; ``edited`` is NaN where the checkpoint collapsed.
    Per-subject ``"mmlu/<subject>"`` rows are left out unless ``subjects``.
    """
    run = scores[scores["run_id"] == run_id]
    if not subjects:
        run = run[~run["task"].astype(str).str.contains("/")]
    keys = ["task", "metric"]
    before = run[run["n_edits"] == 0][keys + ["value"]].rename(columns={"value": "unedited"})
    after = run[run["n_edits"] == n_edits][keys + ["value", "ci_low", "ci_high", "n", "status"]]
    after = after.rename(columns={"value": "edited"})
    table = after.merge(before, on=keys, how="left")
    table["change"] = table["edited"] - table["unedited"]
    columns = ["task", "metric", "unedited", "edited", "ci_low", "ci_high", "change", "n", "status"]
    return table[columns].sort_values(keys).reset_index(drop=True)


def edit_quality_at(edit_quality: pd.DataFrame, run_id: str, n_edits: int) -> pd.DataFrame:
    """Edit-quality rates of one run at ``n_edits``: rows (scope, metric), columns per convention.

    Each cell is ``value`` (the 95% CI is in the saved frame). Empty at 0 edits.
    """
    rows = edit_quality[(edit_quality["run_id"] == run_id) & (edit_quality["n_edits"] == n_edits)]
    if rows.empty:
        return pd.DataFrame()
    table = rows.pivot_table(index=["scope", "metric"], columns="convention", values="value", aggfunc="first")
    table.columns.name = None
    present = list(table.columns)
    table = table[[c for c in _CONVENTION_ORDER if c in present] + [c for c in present if c not in _CONVENTION_ORDER]]
    table = table.reset_index()
    order = {name: i for i, name in enumerate(_METRIC_ORDER)}
    table["_order"] = table["metric"].map(order).fillna(len(order))
    return table.sort_values(["scope", "_order", "metric"]).drop(columns="_order").reset_index(drop=True)


def generations_at(generations: pd.DataFrame, run_id: str, n_edits: int, limit: int | None = 3) -> pd.DataFrame:
    """Greedy outputs on the fixed probe prompts before editing and at ``n_edits``.

    Returns columns ``prompt, before, after`` in prompt order, at most ``limit`` rows.
    """
    run = generations[generations["run_id"] == run_id]
    before = run[run["n_edits"] == 0][["prompt", "output"]].rename(columns={"output": "before"})
    after = run[run["n_edits"] == n_edits][["prompt", "output"]].rename(columns={"output": "after"})
    table = before.merge(after, on="prompt", how="outer", sort=False)
    table = table.drop_duplicates("prompt").reset_index(drop=True)
    return table if limit is None else table.head(limit)


def _table_html(frame: pd.DataFrame, empty: str) -> str:
    if frame.empty:
        return f"<p><i>{html.escape(empty)}</i></p>"
    # escape=True (the default) keeps model generations from being read as markup.
    return frame.to_html(index=False, float_format=lambda v: f"{v:.4f}", na_rep="–", border=0)


class CheckpointExplorer(widgets.VBox):
    """A run selector and a checkpoint slider over one study's saved results.

    Attributes:
        run_selector: dropdown over runs (shown only when there are several).
        slider: ``SelectionSlider`` over the selected run's checkpoints (n_edits).
        output: the HTML pane that :meth:`render` fills.
    """

    def __init__(self, result: Results, n_generations: int = 3) -> None:
        self.result = result
        self.n_generations = n_generations
        checkpoints = result.checkpoints
        if checkpoints.empty:
            raise ValueError(f"no checkpoints saved under {result.results_dir}")
        run_ids = list(dict.fromkeys(checkpoints["run_id"]))
        self.run_selector = widgets.Dropdown(
            options=[(run_label(checkpoints, r), r) for r in run_ids], value=run_ids[0], description="run"
        )
        self.slider = widgets.SelectionSlider(
            options=self._checkpoints(run_ids[0]), description="edits", continuous_update=False
        )
        self.slider.value = self.slider.options[-1]
        self.output = widgets.HTML()
        self.run_selector.observe(self.on_run_change, names="value")
        self.slider.observe(self.update, names="value")
        controls = [self.run_selector, self.slider] if len(run_ids) > 1 else [self.slider]
        super().__init__(children=[widgets.HBox(controls), self.output])
        self.update()

    def _checkpoints(self, run_id: str) -> list[int]:
        frame = self.result.checkpoints
        return sorted(int(n) for n in frame.loc[frame["run_id"] == run_id, "n_edits"].unique())

    def on_run_change(self, change: Any = None) -> None:
        """Callback for the run dropdown: reset the slider to the new run's checkpoints."""
        options = self._checkpoints(self.run_selector.value)
        previous = self.slider.value
        # Setting options resets the value to the first option; restore it where it exists.
        self.slider.options = options
        self.slider.value = previous if previous in options else options[-1]
        self.update()

    def update(self, change: Any = None) -> None:
        """Callback for the slider: redraw the pane for the current run and checkpoint."""
        self.output.value = self.render(self.run_selector.value, int(self.slider.value))

    def render(self, run_id: str, n_edits: int) -> str:
        """The HTML shown for one run at one checkpoint."""
        result = self.result
        checkpoint = result.checkpoints[
            (result.checkpoints["run_id"] == run_id) & (result.checkpoints["n_edits"] == n_edits)
        ].iloc[0]
        label = html.escape(run_label(result.checkpoints, run_id))
        status = str(checkpoint["status"])
        if status == "collapsed":
            reason = checkpoint.get("reason")
            reason_text = f": {html.escape(str(reason))}" if isinstance(reason, str) and reason else ""
            header = f"<b style='color:#d62728'>collapsed{reason_text}</b> (scores are not defined)"
        else:
            header = f"status <b>{html.escape(status)}</b>"
        timing = ", ".join(
            f"{name} {checkpoint[column]:.1f} s"
            for name, column in (("editing", "edit_seconds"), ("evaluation", "eval_seconds"))
            if column in checkpoint and pd.notna(checkpoint[column])
        )
        parts = [
            f"<h4>{label} after {n_edits} edit{'s' if n_edits != 1 else ''}</h4>",
            f"<p>{header}{' · ' + timing if timing else ''}</p>",
            "<h5>Benchmarks (unedited vs now; CI is 95%)</h5>",
            _table_html(scores_at(result.scores, run_id, n_edits), "no benchmark scores at this checkpoint"),
            "<h5>Edit quality</h5>",
            _table_html(edit_quality_at(result.edit_quality, run_id, n_edits), "no edit-quality rows at this checkpoint (none at 0 edits)"),
            "<h5>Generations: before editing vs now</h5>",
            _table_html(
                generations_at(result.generations, run_id, n_edits, self.n_generations),
                "no generations saved",
            ),
        ]
        return "\n".join(parts)


def checkpoint_explorer(result: Results, n_generations: int = 3) -> CheckpointExplorer:
    """A widget to step through a study's checkpoints.

    Shows, for the chosen run and number of edits: per-benchmark scores next to the
    unedited model, edit-quality rates, and a few generations before editing vs now.
    Every number comes from ``result``'s frames (see :func:`scores_at`,
    :func:`edit_quality_at`, :func:`generations_at`), i.e. from saved files.
    """
    return CheckpointExplorer(result, n_generations=n_generations)

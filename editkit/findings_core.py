"""Shared machinery of :mod:`editkit.findings`: item-resampled score curves of every run.

:func:`run_curves` turns the per-item rows of one task into, per run, the score at every
checkpoint and ``n_boot`` bootstrap replicates of those scores in which **one** resample
of the item ids is used for every checkpoint of the run (a paired bootstrap: an item
counts as often after the edits as before). The resample is drawn from a generator seeded
by ``(seed, task, the sorted item ids)``, so two runs evaluated on the same items (two
models of a base/instruct pair) get the same resample, and a difference of their
replicates is paired too; runs on different item sets get unrelated resamples.

A checkpoint whose model collapsed was not evaluated (it has no items); its score is
the task's chance level (:data:`editkit.viz.CHANCE_LEVELS`, 0 where the task has none),
in the estimate and in every replicate.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .paired import RUN_COLUMNS, as_float
from .results import Results

__all__ = ["Curve", "RUN_COLUMNS", "chance_level", "check_task", "interval", "item_column", "need_replicates",
           "run_curves"]

_CELLS_PER_CHUNK = 2_000_000  # bounds a (replicates x items) count matrix to ~16 MB


@dataclass(frozen=True)
class Curve:
    """One run's scores on one task at every checkpoint, with paired bootstrap replicates.

    Attributes:
        axes: the run's columns (:data:`RUN_COLUMNS`) and their values.
        task: the benchmark task.
        n_edits: the checkpoints, ascending, starting at 0; shape (C,).
        score: mean item score per checkpoint (collapsed: the chance level); shape (C,).
        replicates: the same on ``n_boot`` paired item resamples; shape (n_boot, C).
        collapsed: whether each checkpoint collapsed; shape (C,).
        chance: the task's chance level (0 when unknown).
        n_items: distinct items of the run.
        items_key: a digest of the sorted item ids (equal keys: the same resamples).
    """

    axes: dict[str, Any]
    task: str
    n_edits: np.ndarray
    score: np.ndarray
    replicates: np.ndarray
    collapsed: np.ndarray
    chance: float
    n_items: int
    items_key: str


def chance_level(task: str) -> float:
    """Accuracy of uniform guessing on ``task`` (:data:`editkit.viz.CHANCE_LEVELS`), 0 when unknown."""
    from .viz import CHANCE_LEVELS  # deferred: viz imports altair

    return float(CHANCE_LEVELS.get(task, 0.0))


def item_column(metric: str) -> str:
    """The per-item column behind an accuracy metric: ``acc`` -> ``correct``, ``acc_<x>`` -> ``correct_<x>``."""
    if metric == "acc":
        return "correct"
    if metric.startswith("acc_"):
        return "correct_" + metric[len("acc_"):]
    raise ValueError(f"metric {metric!r} is not an item accuracy; use 'acc' or 'acc_<x>' (e.g. 'acc_norm')")


def check_task(task: str, present: Sequence[str] | set[str], what: str = "items") -> None:
    """Raise ValueError when ``task`` is not a registered benchmark task or has no rows in ``present``."""
    from .benchmarks.tasks import list_tasks

    known = list_tasks()
    if task not in known:
        raise ValueError(f"unknown task {task!r} (known tasks: {', '.join(known)})")
    if task not in set(present):
        raise ValueError(f"task {task!r} has no {what} in the results (they have {sorted(set(present))})")


def need_replicates(frame: pd.DataFrame, made_by: str) -> None:
    """Raise ValueError when ``frame`` lacks the ``replicates`` column that ``made_by`` returns."""
    if "replicates" not in frame:
        raise ValueError(f"the frame has no 'replicates' column: pass {made_by}'s frame with its replicates")


def interval(replicates: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile interval of 1-D bootstrap replicates, ignoring NaN ones (NaN when none is finite)."""
    values = np.asarray(replicates, dtype=float).ravel()
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return math.nan, math.nan
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _as_float(values: pd.Series) -> np.ndarray:
    """Item scores (bool, number, None) as floats, NaN where missing (:func:`editkit.paired.as_float`)."""
    return np.array([as_float(v) for v in values], dtype=float)


def _means(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Count-weighted means of the non-NaN ``values`` (items, C), one per row of ``counts`` (R, items)."""
    present = np.isfinite(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (counts @ np.where(present, values, 0.0)) / (counts @ present.astype(float))


def _bootstrap_means(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """:func:`_means` over ``n_boot`` resamples of the items (rows of ``values``), one resample for all columns.

    Resamples are drawn in chunks so that a chunk's (resamples x items) count matrix stays
    near 16 MB whatever the number of items (14k for MMLU).
    """
    n_items = len(values)
    out = np.empty((n_boot, values.shape[1]))
    step = max(1, _CELLS_PER_CHUNK // max(n_items, 1))
    for start in range(0, n_boot, step):
        rows = min(step, n_boot - start)
        drawn = rng.integers(0, n_items, size=(rows, n_items))
        keys = (np.arange(rows)[:, None] * n_items + drawn).ravel()
        counts = np.bincount(keys, minlength=rows * n_items).reshape(rows, n_items).astype(float)
        out[start:start + rows] = _means(values, counts)
    return out


def run_curves(results: Results, task: str, metric: str = "acc", *, n_boot: int = 2000,
               seed: int = 0) -> list[Curve]:
    """Every run's :class:`Curve` on ``task``, from ``results.items`` (and ``results.scores`` for collapses).

    An item's score is its ``correct`` column (``correct_<x>`` for ``acc_<x>``); a checkpoint's
    score is the mean over its items with a score (a checkpoint missing some items is the
    mean of the others). Checkpoints that collapsed are read from ``results.scores``
    (``status == "collapsed"``) and score the chance level.

    Raises:
        ValueError: no items, an unknown task or one without items, a metric without its
            item column, an item twice in one checkpoint, or a run without an unedited
            (``n_edits == 0``) checkpoint (all such runs are named).
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    items = results.items
    if items is None or items.empty:
        raise ValueError("the results have no items; load them with load_results(root, items=True)")
    column = item_column(metric)
    check_task(task, set(items["task"]))
    frame = items[items["task"] == task]
    if column not in frame or frame[column].isna().all():
        raise ValueError(f"task {task!r} has no {column!r} item scores, so no {metric!r} "
                         f"(its item columns: {sorted(c for c in frame.columns if c.startswith('correct'))})")
    duplicated = frame.duplicated(["run_id", "n_edits", "item_id"])
    if duplicated.any():
        first = frame[duplicated].iloc[0]
        raise ValueError(f"item {first['item_id']!r} of {task} appears twice in run {first['run_id']} "
                         f"at {first['n_edits']} edits")
    scores = results.scores
    collapsed_rows = (scores[(scores["task"] == task) & (scores["status"] == "collapsed")]
                      if scores is not None and len(scores) and "status" in scores else pd.DataFrame())
    collapsed: dict[str, set[int]] = {}
    for run_id, n in zip(collapsed_rows.get("run_id", []), collapsed_rows.get("n_edits", [])):
        collapsed.setdefault(run_id, set()).add(int(n))
    unedited = set(frame.loc[frame["n_edits"] == 0, "run_id"])
    orphans = sorted(set(frame["run_id"]) - unedited)
    if orphans:
        raise ValueError(f"runs {orphans} have no unedited (n_edits == 0) items on {task}: "
                         "every statistic here is measured against the run's unedited model")
    chance = chance_level(task)
    curves = []
    for run_id, run in frame.groupby("run_id", sort=True):
        axes = {c: run[c].iloc[0] for c in RUN_COLUMNS}
        measured = sorted(int(n) for n in run["n_edits"].unique())
        fallen = sorted(collapsed.get(run_id, set()) - set(measured))
        n_edits = np.array(sorted([*measured, *fallen]))
        ids = sorted({str(i) for i in run["item_id"]})
        position = {item: k for k, item in enumerate(ids)}
        values = np.full((len(ids), len(n_edits)), math.nan)
        rows = [position[str(i)] for i in run["item_id"]]
        cols = np.searchsorted(n_edits, run["n_edits"].to_numpy(dtype=int))
        values[rows, cols] = _as_float(run[column])
        is_collapsed = np.isin(n_edits, fallen)
        key = f"{zlib.crc32(chr(0).join(ids).encode()):08x}-{len(ids)}"
        rng = np.random.default_rng([seed, zlib.crc32(task.encode()), zlib.crc32(key.encode())])
        replicates = _bootstrap_means(values, n_boot, rng)
        score = _means(values, np.ones((1, len(ids))))[0]
        score[is_collapsed] = chance
        replicates[:, is_collapsed] = chance
        curves.append(Curve(axes, task, n_edits, score, replicates, is_collapsed, chance, len(ids), key))
    return curves

"""Aggregate per-item rows into a tidy table of metrics with bootstrap confidence intervals.

Metric columns are found by name: ``correct`` gives ``acc`` and every
``correct_<x>`` column gives ``acc_<x>`` (``acc_norm``, ``acc_flexible``).
``format_failure`` gives ``format_failure_rate`` (``unusable``, its earlier
name, is read when a frame has no ``format_failure``) and ``finite`` gives
``nonfinite_rate``. ``prediction`` gives ``constant_answer_share``: the
fraction of a task's items whose prediction is the task's most common one
(items without a prediction, ``None`` or a negative choice index, count in the
denominator only). A model that gives every item the same answer scores 1.0,
and its accuracy is then the share of items whose answer that is, not a
measure of ability (a collapsed model's ToxiGen "score").

Each value is the mean over a task's items, with a 95% percentile bootstrap
interval. Tasks whose items have a ``subject`` (MMLU) also get one row per
subject (``task="mmlu/<subject>"``) and a macro average over subjects
(``metric="acc_macro"`` etc.: the mean of the per-subject means). Its interval
resamples items across the whole task and averages the subjects present in
each resample; resampling within subjects instead would give a zero-width
interval for a stratified subset with one item per subject (``limit=57``).

:func:`paired_deltas` compares two evaluations of the same items (an edited
model against the unedited one): per item differences, their mean and a
paired bootstrap interval, which is much narrower than the difference of two
independent intervals when most items keep their answer.

Resampling is exact and cheap where values take few distinct values: the
counts of each value in a resample of n items are Multinomial(n, shares)
(Binomial for 0/1 values). Other values resample item indices.
"""

from __future__ import annotations

import logging
import zlib

import numpy as np
import pandas as pd

__all__ = [
    "aggregate",
    "paired_deltas",
    "metric_columns",
    "constant_answer",
    "bootstrap_means",
    "bootstrap_macro_means",
]

log = logging.getLogger(__name__)

_OUTPUT_COLUMNS = ["task", "metric", "value", "ci_low", "ci_high", "n"]
_PAIRED_COLUMNS = ["task", "metric", "value", "ci_low", "ci_high", "n", "edited", "base"]
_RATES = ("format_failure", "unusable", "finite")  # failure rates: no per-subject or macro rows
_FEW_VALUES = 16  # up to this many distinct values, bootstrap counts instead of indices


def metric_columns(items: pd.DataFrame) -> dict[str, str]:
    """Column -> metric name for the per-item mean columns :func:`aggregate` reports."""
    names: dict[str, str] = {}
    for column in items.columns:
        if column == "correct":
            names[column] = "acc"
        elif column.startswith("correct_"):
            names[column] = "acc_" + column[len("correct_") :]
    if "format_failure" in items.columns:
        names["format_failure"] = "format_failure_rate"
    elif "unusable" in items.columns:  # frames saved before the column was renamed
        names["unusable"] = "format_failure_rate"
    if "finite" in items.columns:
        names["finite"] = "nonfinite_rate"
    return names


def bootstrap_means(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``n_boot`` means of resamples (with replacement) of ``values``."""
    n = len(values)
    if n == 0 or n_boot == 0:
        return np.full(n_boot, np.nan)
    if np.isin(values, (0.0, 1.0)).all():
        return rng.binomial(n, values.mean(), size=n_boot) / n
    distinct, counts = np.unique(values, return_counts=True)
    if len(distinct) <= _FEW_VALUES:
        return rng.multinomial(n, counts / n, size=n_boot) @ distinct / n
    means = np.empty(n_boot)
    step = max(1, 2_000_000 // n)  # bound the index matrix to ~16 MB
    for start in range(0, n_boot, step):
        stop = min(start + step, n_boot)
        means[start:stop] = values[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    return means


def _answers(predictions: pd.Series) -> pd.Series:
    """Predictions as hashable text, with no-answer values (None, NaN, a negative choice index) as NaN."""

    def key(value: object) -> object:
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return np.nan
        if isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and value < 0:
            return np.nan
        return repr(value.item() if isinstance(value, np.generic) else value)

    return predictions.map(key)


def constant_answer(items: pd.DataFrame) -> pd.DataFrame:
    """Each task's most common prediction and the share of its items that got it.

    Returns:
        Columns ``task, prediction, share, n`` (``prediction`` as its ``repr``;
        None where no item has a prediction).
    """
    rows = []
    for task in sorted(items["task"].unique()) if len(items) else []:
        answers = _answers(items.loc[items["task"] == task, "prediction"])
        counts = answers.value_counts()
        top = counts.index[0] if len(counts) else None
        rows.append({"task": task, "prediction": top, "share": counts.iloc[0] / len(answers) if len(counts) else 0.0,
                     "n": len(answers)})
    return pd.DataFrame(rows, columns=["task", "prediction", "share", "n"])


def _constant_row(task: str, frame: pd.DataFrame, n_boot: int, seed: int) -> list[dict]:
    answers = _answers(frame["prediction"])
    n = len(answers)
    if n == 0:
        return []
    # Categories: each distinct answer, plus one for "no answer"; a resample's share is its largest answer count.
    counts = answers.value_counts().to_numpy()
    missing = n - counts.sum()
    shares = np.append(counts, missing) / n
    value = counts.max() / n if len(counts) else 0.0
    if n_boot and len(counts):
        draws = _rng(seed, task, "constant_answer_share").multinomial(n, shares, size=n_boot)
        boots = draws[:, : len(counts)].max(axis=1) / n
    else:
        boots = np.full(n_boot, np.nan)
    row = _row(task, "constant_answer_share", np.array([value]), boots, n)
    return [row]


def _rng(seed: int, task: str, metric: str) -> np.random.Generator:
    # One stream per (task, metric): a row's interval does not depend on which other tasks are present.
    return np.random.default_rng([seed, zlib.crc32(f"{task}\0{metric}".encode())])


def _values(frame: pd.DataFrame, column: str) -> np.ndarray:
    values = frame[column].dropna().astype(float).to_numpy()
    return 1.0 - values if column == "finite" else values


def _per_item(frame: pd.DataFrame, column: str) -> pd.Series:
    """A metric column as floats (NaN where missing), counting failures for ``finite``."""
    values = frame[column].map(lambda v: np.nan if v is None or pd.isna(v) else float(v)).astype(float)
    return 1.0 - values if column == "finite" else values


def _row(task: str, metric: str, values: np.ndarray, boots: np.ndarray, n: int) -> dict:
    low, high = (np.nanpercentile(boots, [2.5, 97.5]) if len(boots) and not np.isnan(boots).all()
                 else (np.nan, np.nan))
    return {"task": task, "metric": metric, "value": float(np.mean(values)), "ci_low": float(low),
            "ci_high": float(high), "n": int(n)}


def _simple_rows(task: str, frame: pd.DataFrame, names: dict[str, str], n_boot: int, seed: int) -> list[dict]:
    rows = []
    for column, metric in names.items():
        values = _values(frame, column)
        if len(values) == 0:
            continue
        boots = bootstrap_means(values, n_boot, _rng(seed, task, metric))
        rows.append(_row(task, metric, values, boots, len(values)))
    return rows


def bootstrap_macro_means(values: np.ndarray, groups: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``n_boot`` macro averages (mean over the groups present of each group's mean) of item resamples.

    Args:
        values: one value per item.
        groups: integer group code (0..G-1) per item.
    """
    n, n_groups = len(values), int(groups.max()) + 1 if len(groups) else 0
    means = np.full(n_boot, np.nan)
    step = max(1, 2_000_000 // max(n, 1))  # bound the index matrix to ~16 MB
    for start in range(0, n_boot if n else 0, step):
        count = min(step, n_boot - start)
        index = rng.integers(0, n, size=(count, n))
        keys = (np.arange(count)[:, None] * n_groups + groups[index]).ravel()
        sums = np.bincount(keys, weights=values[index].ravel(), minlength=count * n_groups)
        sizes = np.bincount(keys, minlength=count * n_groups)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_group = (sums / sizes).reshape(count, n_groups)
        means[start : start + count] = np.nanmean(per_group, axis=1)
    return means


def _macro_rows(task: str, frame: pd.DataFrame, names: dict[str, str], n_boot: int, seed: int) -> list[dict]:
    rows = []
    for column, metric in names.items():
        if column in _RATES:
            continue
        present = frame[frame[column].notna() & frame["subject"].notna()]
        if present.empty:
            continue
        values = _values(present, column)
        codes = pd.factorize(present["subject"], sort=True)[0]
        per_subject = np.array([values[codes == code].mean() for code in range(codes.max() + 1)])
        boots = bootstrap_macro_means(values, codes, n_boot, _rng(seed, task, metric + "_macro"))
        rows.append(_row(task, f"{metric}_macro", per_subject, boots, len(values)))
    return rows


def aggregate(items: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per-task metrics with 95% percentile bootstrap intervals.

    Args:
        items: rows from :func:`~editkit.benchmarks.evaluation.evaluate` (needs
            ``task`` and the metric columns; ``subject`` for per-subject rows;
            ``prediction`` for the constant-answer share).
        n_boot: bootstrap resamples (0 gives NaN intervals).
        seed: seeds every interval; equal inputs give equal outputs.

    Returns:
        A tidy frame with columns ``task, metric, value, ci_low, ci_high, n``:
        for each task its metrics (``acc``, ``acc_<x>``,
        ``format_failure_rate``, ``nonfinite_rate``,
        ``constant_answer_share``); for tasks with subjects also
        ``<metric>_macro`` (mean of per-subject means) and rows for each
        ``<task>/<subject>`` (accuracies only).
    """
    names = metric_columns(items)
    rows: list[dict] = []
    for task in sorted(items["task"].unique()) if len(items) else []:
        frame = items[items["task"] == task]
        rows += _simple_rows(task, frame, names, n_boot, seed)
        if "prediction" in frame.columns:
            rows += _constant_row(task, frame, n_boot, seed)
        if "subject" in frame.columns and frame["subject"].notna().any():
            rows += _macro_rows(task, frame, names, n_boot, seed)
            for subject in sorted(frame["subject"].dropna().unique()):
                subject_names = {c: m for c, m in names.items() if c not in _RATES}
                rows += _simple_rows(f"{task}/{subject}", frame[frame["subject"] == subject], subject_names,
                                     n_boot, seed)
    return pd.DataFrame(rows, columns=_OUTPUT_COLUMNS)


def paired_deltas(items_edited: pd.DataFrame, items_base: pd.DataFrame, n_boot: int = 1000,
                  seed: int = 0) -> pd.DataFrame:
    """Per-task differences (edited - base) on the items both frames scored, with paired bootstrap intervals.

    Items are matched on ``(task, item_id)``; items present in only one frame
    are left out (and logged). Each metric of :func:`metric_columns` gives the
    mean of its per-item differences; tasks with subjects also get
    ``<metric>_macro`` (the difference of the macro averages, which is the
    macro average of the per-item differences). The interval resamples
    matched items, so both evaluations of an item stay together.

    Args:
        items_edited: rows from :func:`~editkit.benchmarks.evaluation.evaluate` on the edited model.
        items_base: rows from the same call on the unedited model.
        n_boot: bootstrap resamples (0 gives NaN intervals).
        seed: seeds every interval.

    Returns:
        Columns ``task, metric, value, ci_low, ci_high, n, edited, base``:
        ``value`` is the mean difference, ``edited`` and ``base`` the two
        means over the matched items.

    Raises:
        ValueError: a task was scored under different versions in the two frames,
            or a frame lacks ``task``/``item_id``.
    """
    for name, frame in (("items_edited", items_edited), ("items_base", items_base)):
        missing = {"task", "item_id"} - set(frame.columns)
        if missing:
            raise ValueError(f"{name} lacks the column(s) {sorted(missing)}")
    if "task_version" in items_edited.columns and "task_version" in items_base.columns:
        versions = items_edited.groupby("task")["task_version"].first().to_dict()
        for task, version in items_base.groupby("task")["task_version"].first().items():
            if task in versions and versions[task] != version:
                raise ValueError(f"task {task!r} was scored as version {versions[task]!r} and {version!r}: "
                                 "its items are not comparable")
    names = {c: m for c, m in metric_columns(items_edited).items() if c in items_base.columns}
    keep = ["task", "item_id", "subject", *names] if "subject" in items_edited.columns else ["task", "item_id", *names]
    merged = items_edited[keep].merge(items_base[["task", "item_id", *names]], on=["task", "item_id"],
                                      suffixes=("_edited", "_base"))
    dropped = len(items_edited) + len(items_base) - 2 * len(merged)
    if dropped:
        log.warning("paired_deltas: %d item rows have no partner in the other frame and are left out", dropped)
    rows: list[dict] = []
    for task in sorted(merged["task"].unique()):
        frame = merged[merged["task"] == task]
        for column, metric in names.items():
            edited, base = _per_item(frame, column + "_edited"), _per_item(frame, column + "_base")
            both = edited.notna() & base.notna()
            if not both.any():
                continue
            delta = (edited[both] - base[both]).to_numpy()
            boots = bootstrap_means(delta, n_boot, _rng(seed, task, "delta:" + metric))
            rows.append({**_row(task, metric, delta, boots, len(delta)),
                         "edited": float(edited[both].mean()), "base": float(base[both].mean())})
            if column in _RATES or "subject" not in frame.columns or not frame["subject"][both].notna().all():
                continue
            codes = pd.factorize(frame["subject"][both], sort=True)[0]
            boots = bootstrap_macro_means(delta, codes, n_boot, _rng(seed, task, "delta:" + metric + "_macro"))
            macro = [pd.Series(side[both].to_numpy()).groupby(codes).mean().mean() for side in (edited, base)]
            rows.append({**_row(task, f"{metric}_macro", np.array([macro[0] - macro[1]]), boots, len(delta)),
                         "edited": float(macro[0]), "base": float(macro[1])})
    return pd.DataFrame(rows, columns=_PAIRED_COLUMNS)

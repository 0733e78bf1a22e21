"""Aggregate per-item rows into a tidy table of metrics with bootstrap confidence intervals.

Metric columns are found by name: ``correct`` gives ``acc`` and every
``correct_<x>`` column gives ``acc_<x>`` (``acc_norm``, ``acc_flexible``).
``unusable`` gives ``unusable_rate`` and ``finite`` gives ``nonfinite_rate``.
Each value is the mean over a task's items, with a 95% percentile bootstrap
interval. Tasks whose items have a ``subject`` (MMLU) also get one row per
subject (``task="mmlu/<subject>"``) and a macro average over subjects
(``metric="acc_macro"`` etc.: the mean of the per-subject means). Its interval
resamples items across the whole task and averages the subjects present in
each resample; resampling within subjects instead would give a zero-width
interval for a stratified subset with one item per subject (``limit=57``).

For 0/1 values the bootstrap is drawn exactly and cheaply: the number of ones
in a resample of n items with replacement is Binomial(n, mean). Other values
resample item indices.
"""

from __future__ import annotations

import zlib

import numpy as np
import pandas as pd

__all__ = ["aggregate", "metric_columns", "bootstrap_means", "bootstrap_macro_means"]

_OUTPUT_COLUMNS = ["task", "metric", "value", "ci_low", "ci_high", "n"]


def metric_columns(items: pd.DataFrame) -> dict[str, str]:
    """Column -> metric name for the columns :func:`aggregate` reports."""
    names: dict[str, str] = {}
    for column in items.columns:
        if column == "correct":
            names[column] = "acc"
        elif column.startswith("correct_"):
            names[column] = "acc_" + column[len("correct_") :]
    if "unusable" in items.columns:
        names["unusable"] = "unusable_rate"
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
    means = np.empty(n_boot)
    step = max(1, 2_000_000 // n)  # bound the index matrix to ~16 MB
    for start in range(0, n_boot, step):
        stop = min(start + step, n_boot)
        means[start:stop] = values[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    return means


def _rng(seed: int, task: str, metric: str) -> np.random.Generator:
    # One stream per (task, metric): a row's interval does not depend on which other tasks are present.
    return np.random.default_rng([seed, zlib.crc32(f"{task}\0{metric}".encode())])


def _values(frame: pd.DataFrame, column: str) -> np.ndarray:
    values = frame[column].dropna().astype(float).to_numpy()
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
        if column in ("unusable", "finite"):
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
            ``task`` and the metric columns; ``subject`` for per-subject rows).
        n_boot: bootstrap resamples (0 gives NaN intervals).
        seed: seeds every interval; equal inputs give equal outputs.

    Returns:
        A tidy frame with columns ``task, metric, value, ci_low, ci_high, n``:
        for each task its metrics (``acc``, ``acc_<x>``, ``unusable_rate``,
        ``nonfinite_rate``); for tasks with subjects also ``<metric>_macro``
        (mean of per-subject means) and rows for each ``<task>/<subject>``.
    """
    names = metric_columns(items)
    rows: list[dict] = []
    for task in sorted(items["task"].unique()) if len(items) else []:
        frame = items[items["task"] == task]
        rows += _simple_rows(task, frame, names, n_boot, seed)
        if "subject" in frame.columns and frame["subject"].notna().any():
            rows += _macro_rows(task, frame, names, n_boot, seed)
            for subject in sorted(frame["subject"].dropna().unique()):
                subject_names = {c: m for c, m in names.items() if c not in ("unusable", "finite")}
                rows += _simple_rows(f"{task}/{subject}", frame[frame["subject"] == subject], subject_names,
                                     n_boot, seed)
    return pd.DataFrame(rows, columns=_OUTPUT_COLUMNS)

"""Paired statistics of every edited checkpoint against its unedited model, item by item.

Each checkpoint of a run is evaluated on the same benchmark items as the run's unedited
model (``n_edits == 0``), so what a sequence of edits changed can be measured on each item
and tested with paired statistics. Pairing removes the item-to-item variance that two
independent accuracies with their own intervals carry, and sees much smaller drops.
:func:`editkit.benchmarks.paired_deltas` does the same for two item frames of one
evaluation (every metric column, intervals only); this module works on a results root,
per checkpoint, with p-values, and shares its bootstrap.

:func:`item_changes` matches every checkpoint's items with the reference's on
``(task, item_id)``, never on row order, and gives three scores per item, before and after:

* ``loglik``: the gold choice's log-likelihood, ``logprobs[gold]`` (choice tasks only);
* ``prob``: the gold's share of the probability over the choices, ``softmax(logprobs)[gold]``
  (choice tasks only);
* ``acc``: correctness, 0 or 1 (a graded score in [0, 1] for tasks that give one).

A task with several true choices (TruthfulQA MC2) uses all of them: the log of their summed
probability, and their summed share. Generation tasks have no ``logprobs``: acc only.

Items present on one side only are left out of every metric. Items non-finite or unusable
on either side are left out of loglik and prob but kept in acc, where they count as wrong
(as in the benchmark's own score), so that the accuracy change of a collapsing model shows
its damage; an item whose gold log-likelihood cannot be read (no ``logprobs``, a target
that is not a choice index) is left out of loglik and prob. Every item left out is counted
in ``n_excluded`` and named in ``item_changes(...)["excluded"]``, never dropped silently.

:func:`deltas` gives, per checkpoint, task and metric, the mean change with a paired
bootstrap interval (:func:`paired_bootstrap`) and a two-sided p-value:

* acc: the exact McNemar test on the discordant items (:func:`mcnemar_exact`); tasks with
  graded scores fall back to the sign-flip test.
* loglik, prob: a sign-flip randomisation test of the paired differences
  (:func:`sign_flip_p`; exact with up to 12 changed items). scipy is not a dependency of
  editkit, so there is no Wilcoxon signed-rank test.

A checkpoint that collapsed was not evaluated (it has no items), so it has no rows here;
:attr:`editkit.results.Results.checkpoints` gives its status.

:func:`first_significant_drop` finds, per run and task, the first checkpoint with a
significant drop after Holm's correction over the run's checkpoints (:func:`holm`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .benchmarks.metrics import bootstrap_means

__all__ = ["CHANGE_COLUMNS", "DELTA_COLUMNS", "DROP_COLUMNS", "METRICS", "PairedTest", "deltas",
           "first_significant_drop", "holm", "item_changes", "mcnemar_exact", "paired_bootstrap", "sign_flip_p"]

log = logging.getLogger(__name__)

METRICS = ("loglik", "prob", "acc")
RUN_COLUMNS = ("model", "method", "dataset", "seed", "edit_batch_size", "run_id")
DELTA_COLUMNS = (*RUN_COLUMNS, "n_edits", "task", "metric", "delta", "ci_low", "ci_high", "p_value", "n_items",
                 "n_excluded")
DROP_COLUMNS = (*RUN_COLUMNS, "task", "first_drop", "p_adjusted", "n_tested")
CHANGE_COLUMNS = (*RUN_COLUMNS, "n_edits", "task", "item_id", "excluded",
                  *(f"{metric}_{side}" for metric in METRICS for side in ("before", "after")))
_REQUIRED = (*RUN_COLUMNS, "n_edits", "task", "item_id", "correct")
# Random signs drawn at once: bounds memory (1 byte each) for 14k-item MMLU.
_DRAWS_PER_CHUNK = 4_000_000
# Up to this many non-zero differences, sign_flip_p enumerates every pattern of signs.
_EXACT_SIGNS = 12


@dataclass(frozen=True)
class PairedTest:
    """The mean of paired differences, its percentile interval and a two-sided p-value.

    Attributes:
        delta: mean difference (after minus before); NaN without items.
        ci_low, ci_high: percentile bootstrap interval; NaN with fewer than two items.
        p_value: two-sided p-value for "no mean change"; NaN with fewer than two items.
        n_items: number of paired differences.
    """

    delta: float
    ci_low: float
    ci_high: float
    p_value: float
    n_items: int


def paired_bootstrap(differences: Sequence[float] | np.ndarray, *, n_boot: int = 2000, seed: int = 0,
                     alpha: float = 0.05) -> PairedTest:
    """Percentile bootstrap of the mean of per-item differences, and a sign-flip p-value.

    Resampling the differences resamples each item together with its own reference, the
    paired bootstrap. The p-value is :func:`sign_flip_p` with ``n_boot`` patterns (exact
    with few items, where a bootstrap p-value would be far too small). With few items
    (tens) the percentile interval is too narrow: read it there as descriptive. The
    resampling is :func:`editkit.benchmarks.metrics.bootstrap_means`, the benchmarks' own.

    Args:
        differences: one change per item (after minus before), all finite.
        n_boot: number of resamples.
        seed: seed of the resampling; the same seed and data give the same result.
        alpha: 1 minus the interval's coverage.

    Raises:
        ValueError: a difference is not finite, or ``n_boot`` < 1.
    """
    values = np.asarray(differences, dtype=float).ravel()
    if not np.isfinite(values).all():
        raise ValueError("paired_bootstrap needs finite differences (leave out non-finite items first)")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    n = len(values)
    if n == 0:
        return PairedTest(math.nan, math.nan, math.nan, math.nan, 0)
    mean = float(values.mean())
    if n < 2:  # one item: a resample is the item itself, which says nothing about spread
        return PairedTest(mean, math.nan, math.nan, math.nan, 1)
    means = bootstrap_means(values, n_boot, np.random.default_rng(seed))
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return PairedTest(mean, float(low), float(high), sign_flip_p(values, n_perm=n_boot, seed=seed), n)


def sign_flip_p(differences: Sequence[float] | np.ndarray, *, n_perm: int = 2000, seed: int = 0) -> float:
    """Two-sided p-value of "no change" by flipping the signs of paired differences.

    Under the null hypothesis each item's change is as likely to be negative as positive,
    so every pattern of signs is equally likely; the p-value is the share of patterns whose
    |sum| reaches the observed one. With up to 12 non-zero differences all 2^n patterns are
    enumerated (exact: two items can never give p below 0.5); above that, ``n_perm``
    random patterns, counting the observed one, give ``(1 + hits) / (n_perm + 1)``. It is 1
    when the sum is 0. Zero differences do not change under a flip and are left out.

    Raises:
        ValueError: a difference is not finite.
    """
    values = np.asarray(differences, dtype=float).ravel()
    if not np.isfinite(values).all():
        raise ValueError("sign_flip_p needs finite differences")
    values = values[values != 0]
    observed = abs(float(values.sum()))
    if observed == 0:
        return 1.0
    reach = observed * (1 - 1e-9)  # a pattern equal to the observed one, up to summation rounding
    n = len(values)
    if n <= _EXACT_SIGNS:
        signs = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1) * 2 - 1
        return float(np.mean(np.abs(signs @ values) >= reach))
    rng = np.random.default_rng(seed)
    hits, step = 0, max(1, _DRAWS_PER_CHUNK // n)
    for start in range(0, n_perm, step):
        signs = rng.integers(0, 2, size=(min(step, n_perm - start), n), dtype=np.int8) * 2 - 1
        hits += int(np.count_nonzero(np.abs(signs @ values) >= reach))
    return (1 + hits) / (n_perm + 1)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pair counts.

    ``p = min(1, 2 * P(X <= min(b, c)))`` with ``X ~ Binomial(b + c, 1/2)``; 1 when
    ``b + c == 0``. Computed in exact integer arithmetic, so it holds for any count.

    Args:
        b: items right before and wrong after (lost).
        c: items wrong before and right after (gained).

    Raises:
        ValueError: a negative count.
    """
    if b < 0 or c < 0:
        raise ValueError(f"counts must be non-negative, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    term, tail = 1, 1  # C(n, 0); then C(n, i + 1) = C(n, i) * (n - i) / (i + 1), exact in integers
    for i in range(min(b, c)):
        term = term * (n - i) // (i + 1)
        tail += term
    return min(1.0, 2 * tail / 2**n)  # int / int is correctly rounded even for huge n


def holm(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm–Bonferroni step-down adjusted p-values, in the input's order.

    With the m tested p-values sorted ascending, the i-th (from 0) is adjusted to
    ``max over j <= i of min(1, (m - j) * p_(j))``; rejecting where the adjusted p is below
    alpha controls the family-wise error rate at alpha. NaN p-values are not tested: they
    stay NaN and do not count in m.
    """
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, math.nan)
    tested = np.flatnonzero(~np.isnan(p))
    running = 0.0
    for rank, index in enumerate(tested[np.argsort(p[tested], kind="stable")]):
        running = max(running, min(1.0, (len(tested) - rank) * p[index]))
        adjusted[index] = running
    return adjusted


def _gold_indices(target: Any, n_choices: int) -> tuple[int, ...] | None:
    """The gold choice indices of a choice item (stored as text: ``"2"`` or ``"[0, 1]"``), or None."""
    if isinstance(target, str):
        try:
            target = json.loads(target)
        except ValueError:
            return None
    golds = target if isinstance(target, (list, tuple, np.ndarray)) else [target]
    if not len(golds) or not all(isinstance(g, (int, np.integer)) and not isinstance(g, bool) for g in golds):
        return None
    return tuple(int(g) for g in golds) if all(0 <= g < n_choices for g in golds) else None


def _gold_scores(logprobs: Sequence[Any], target: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Per row, (log-likelihood, probability share) of the gold choices; NaN where they cannot be read."""
    loglik, prob = np.full(len(logprobs), math.nan), np.full(len(logprobs), math.nan)
    lengths = np.array([len(v) if isinstance(v, (list, tuple, np.ndarray)) else 0 for v in logprobs])
    index = pd.to_numeric(pd.Series(list(target), dtype=object), errors="coerce").to_numpy(dtype=float)
    for n_choices in np.unique(lengths[lengths > 0]):
        rows = np.flatnonzero(lengths == n_choices)
        values = np.array([logprobs[i] for i in rows], dtype=float)  # (rows, choices)
        gold = np.zeros(values.shape, dtype=bool)
        single = (index[rows] == np.floor(index[rows])) & (index[rows] >= 0) & (index[rows] < n_choices)
        gold[np.flatnonzero(single), index[rows][single].astype(int)] = True
        for j in np.flatnonzero(~single):  # several true choices ("[0, 1]"), or an unreadable target
            golds = _gold_indices(target[rows[j]], int(n_choices))
            gold[j, list(golds or ())] = True
        readable = np.isfinite(values).all(axis=1) & gold.any(axis=1)
        values, gold, rows = values[readable], gold[readable], rows[readable]
        # log-sum-exp from the largest: long choices' probabilities underflow exp() on their own
        top = values.max(axis=1, keepdims=True)
        total = top[:, 0] + np.log(np.exp(values - top).sum(axis=1))
        gold_top = np.where(gold, values, -np.inf).max(axis=1, keepdims=True)
        loglik[rows] = gold_top[:, 0] + np.log(np.where(gold, np.exp(values - gold_top), 0.0).sum(axis=1))
        prob[rows] = np.exp(loglik[rows] - total)
    return loglik, prob


def as_float(value: Any) -> float:
    """An item score (bool, number or None) as a float, NaN where missing."""
    return math.nan if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _flag(items: pd.DataFrame, names: Sequence[str], default: bool) -> np.ndarray:
    """A boolean per row from the first of ``names`` present (missing values read as ``default``)."""
    for name in names:
        if name in items:
            return items[name].astype(object).where(items[name].notna(), default).astype(bool).to_numpy()
    return np.full(len(items), default)


def _scored(items: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in _REQUIRED if c not in items]
    if missing:
        raise ValueError(f"items lack columns {missing} (they have {list(items.columns)})")
    duplicated = items.duplicated(["run_id", "n_edits", "task", "item_id"])
    if duplicated.any():
        first = items[duplicated].iloc[0]
        raise ValueError(f"{int(duplicated.sum())} items appear twice in one checkpoint, e.g. run "
                         f"{first['run_id']} at {first['n_edits']} edits: {first['task']} {first['item_id']}")
    absent = [None] * len(items)
    loglik, prob = _gold_scores(list(items["logprobs"]) if "logprobs" in items else absent,
                                list(items["target"]) if "target" in items else absent)
    return items[[*RUN_COLUMNS, "n_edits", "task", "item_id"]].assign(
        loglik=loglik, prob=prob, acc=[as_float(v) for v in items["correct"]],
        finite=_flag(items, ("finite",), True), unusable=_flag(items, ("unusable", "format_failure"), False))


def item_changes(items: pd.DataFrame) -> pd.DataFrame:
    """Every item of every edited checkpoint next to the same item of its run's unedited model.

    Args:
        items: ``Results.items`` (needs run_id, the grid axes, n_edits, task, item_id and
            correct; reads target, logprobs, finite and unusable when present).

    Returns:
        One row per (checkpoint with ``n_edits > 0``, item of either side), columns
        :data:`CHANGE_COLUMNS`: ``<metric>_before``/``<metric>_after`` for loglik, prob and
        acc, and ``excluded``, the reason an item is left out of every metric
        (``"missing before"``, ``"missing after"``, ``"non-finite"``, ``"unusable"``) or None.
        Runs without an ``n_edits == 0`` checkpoint have no rows and are named in a warning.

    Raises:
        ValueError: a required column is missing, or an item appears twice in one checkpoint.
    """
    scored = _scored(items)
    reference = scored[scored["n_edits"] == 0]
    edited = scored[scored["n_edits"] > 0]
    orphans = sorted(set(edited["run_id"]) - set(reference["run_id"]))
    if orphans:
        log.warning("runs without an unedited (n_edits == 0) checkpoint have no paired changes: %s", orphans)
        edited = edited[~edited["run_id"].isin(orphans)]
    keys = list(RUN_COLUMNS)
    # Every reference item is expected at every checkpoint of its run; an outer merge keeps
    # the items found on one side only, to be counted rather than lost.
    expected = edited[[*keys, "n_edits"]].drop_duplicates().merge(reference.drop(columns="n_edits"), on=keys)
    merged = expected.merge(edited, on=[*keys, "n_edits", "task", "item_id"], how="outer",
                            suffixes=("_before", "_after"), indicator=True)
    side = merged.pop("_merge").astype(str)
    finite = _flag(merged, ("finite_before",), True) & _flag(merged, ("finite_after",), True)
    unusable = _flag(merged, ("unusable_before",), False) | _flag(merged, ("unusable_after",), False)
    reasons = np.select([side == "right_only", side == "left_only", ~finite, unusable],
                        ["missing before", "missing after", "non-finite", "unusable"], default="")
    merged["excluded"] = [reason or None for reason in reasons]
    merged = merged.sort_values([*keys, "n_edits", "task", "item_id"], kind="stable").reset_index(drop=True)
    return merged[list(CHANGE_COLUMNS)]


def _binary(*arrays: np.ndarray) -> bool:
    return all(np.isin(a, (0.0, 1.0)).all() for a in arrays)


def deltas(items: pd.DataFrame, *, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> pd.DataFrame:
    """Mean paired change of each edited checkpoint against its run's unedited model.

    Args:
        items: ``Results.items``, with the ``n_edits == 0`` checkpoint of every run.
        n_boot: bootstrap resamples per (checkpoint, task, metric).
        seed: bootstrap seed; every (checkpoint, task, metric) starts from it, so a row does
            not depend on which other runs are in ``items``.
        alpha: 1 minus the intervals' coverage.

    Returns:
        One row per (run, checkpoint with ``n_edits > 0``, task, metric), columns
        :data:`DELTA_COLUMNS`. ``delta`` is the mean of after minus before over the
        ``n_items`` usable pairs (NaN when there are none); ``ci_low``/``ci_high`` its
        paired bootstrap interval; ``p_value`` the exact McNemar test for acc and the
        sign-flip test otherwise (see the module docstring); ``n_excluded`` the items of
        either side left out. Metrics loglik and prob only for tasks with ``logprobs``.
        Empty (with the columns) without items or without any unedited checkpoint.
    """
    if items.empty:
        return pd.DataFrame(columns=list(DELTA_COLUMNS))
    changes = item_changes(items)
    with_logprobs = set(items.loc[items["logprobs"].notna(), "task"]) if "logprobs" in items else set()
    rows = []
    for key, group in changes.groupby([*RUN_COLUMNS, "n_edits", "task"], sort=True, dropna=False):
        kept = group["excluded"].isna().to_numpy()
        # A non-finite or unusable answer is wrong in the benchmark's score, and must be in acc's
        # change too: leaving it out would hide the damage of a collapsing model.
        present = ~group["excluded"].isin(("missing before", "missing after")).to_numpy()
        for metric in (METRICS if key[-1] in with_logprobs else ("acc",)):
            before = group[f"{metric}_before"].to_numpy(dtype=float)
            after = group[f"{metric}_after"].to_numpy(dtype=float)
            use = (present if metric == "acc" else kept) & np.isfinite(before) & np.isfinite(after)
            test = paired_bootstrap(after[use] - before[use], n_boot=n_boot, seed=seed, alpha=alpha)
            p_value = test.p_value
            if metric == "acc" and test.n_items and _binary(before[use], after[use]):
                lost = int(np.count_nonzero((before[use] == 1) & (after[use] == 0)))
                gained = int(np.count_nonzero((before[use] == 0) & (after[use] == 1)))
                p_value = mcnemar_exact(lost, gained)
            rows.append((*key[:-1], key[-1], metric, test.delta, test.ci_low, test.ci_high, p_value, test.n_items,
                         len(group) - test.n_items))
    return pd.DataFrame(rows, columns=list(DELTA_COLUMNS))


def first_significant_drop(deltas: pd.DataFrame, metric: str = "acc", alpha: float = 0.05) -> pd.DataFrame:
    """The first checkpoint of each run and task whose ``metric`` dropped significantly.

    Within a group (one run, one task) the p-values of all its checkpoints are adjusted
    together by Holm's step-down method (:func:`holm`), which keeps the chance of flagging
    any checkpoint of an undamaged run below ``alpha``. A checkpoint is a significant drop
    when its adjusted p is below ``alpha`` and its ``delta`` is negative; the first is the
    one with the fewest edits. Checkpoints without a p-value (no usable items) are not tested.

    Args:
        deltas: the frame of :func:`deltas` (or ``Results.deltas``).
        metric: ``"acc"``, ``"loglik"`` or ``"prob"``.
        alpha: family-wise error rate per group.

    Returns:
        One row per group, columns :data:`DROP_COLUMNS`: the run's axes, ``run_id`` (two
        runs that share every axis are still separate families), ``task``, ``first_drop``
        (the number of edits, <NA> when no checkpoint dropped significantly),
        ``p_adjusted`` (its Holm-adjusted p, NaN when none) and ``n_tested`` (the family's size).

    Raises:
        ValueError: ``metric`` is not in a non-empty ``deltas``.
    """
    if len(deltas) and metric not in set(deltas["metric"]):
        raise ValueError(f"metric {metric!r} is not in the deltas (they have {sorted(set(deltas['metric']))})")
    groups = [*RUN_COLUMNS, "task"]
    rows = []
    for key, group in deltas[deltas["metric"] == metric].groupby(groups, sort=True, dropna=False):
        group = group.sort_values("n_edits")
        adjusted = holm(group["p_value"].to_numpy(dtype=float))
        drops = np.flatnonzero((adjusted < alpha) & (group["delta"].to_numpy(dtype=float) < 0))
        first, p_adjusted = (group["n_edits"].iloc[drops[0]], adjusted[drops[0]]) if len(drops) else (None, math.nan)
        rows.append((*key, first, p_adjusted, int(np.count_nonzero(~np.isnan(adjusted)))))
    return pd.DataFrame(rows, columns=list(DROP_COLUMNS)).astype({"first_drop": "Int64"})

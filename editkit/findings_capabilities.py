"""Research question 4: are different capabilities affected differently by editing?

Each task's damage is put on one scale, the *relative drop* (value0 - valueN) / (value0 -
chance): 0 is no damage, 1 is down to chance, whatever the task's own range
(:func:`relative_drop`). Capabilities (:data:`CAPABILITIES`) average their tasks
(:func:`capability_drops`), and :func:`capability_difference_test` asks whether the
capabilities' drops differ by more than tasks differ among themselves.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .findings_core import RUN_COLUMNS, interval, need_replicates, run_curves
from .results import Results

if TYPE_CHECKING:
    import altair as alt

__all__ = ["CAPABILITIES", "capability_difference_test", "capability_drops", "capability_heatmap", "relative_drop"]

# The study's grouping of its general-ability benchmarks; TruthfulQA and ToxiGen are RQ5's (safety).
CAPABILITIES: dict[str, tuple[str, ...]] = {
    "world knowledge": ("mmlu", "mmlu_cloze", "triviaqa"),
    "reasoning and math": ("bbh_cot", "bbh_direct", "gsm8k"),
    "commonsense": ("commonsense_qa", "commonsense_qa_cloze", "commonsense_qa_gen"),
}

_GROUP = (*RUN_COLUMNS, "n_edits")


def _task_capability(capabilities: Mapping[str, Sequence[str]]) -> dict[str, str]:
    found: dict[str, str] = {}
    for capability, tasks in capabilities.items():
        for task in tasks:
            if task in found:
                raise ValueError(f"task {task!r} is in two capabilities: {found[task]!r} and {capability!r}")
            found[task] = capability
    return found


def relative_drop(results: Results, metric: str = "acc", *, capabilities: Mapping[str, Sequence[str]] | None = None,
                  n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> pd.DataFrame:
    """Per run, edited checkpoint and task: (value0 - valueN) / (value0 - chance), with a paired interval.

    The interval resamples the task's item ids once per replicate and recomputes both
    scores on it. A collapsed checkpoint scores chance (relative drop 1). Chance is
    :data:`editkit.viz.CHANCE_LEVELS`, 0 for tasks without one (BBH, GSM8K, TriviaQA: the
    relative drop is then the share of the unedited score lost); where the unedited score
    is not above chance the relative drop is NaN and ``note`` says why.

    Args:
        results: reads ``items`` (``correct`` / ``correct_<x>``) and ``scores`` (collapses).
        metric: ``"acc"`` or ``"acc_<x>"``.
        capabilities: capability -> tasks (default :data:`CAPABILITIES`); only tasks with
            items in the results are used.
        n_boot, seed, alpha: bootstrap replicates, their seed, 1 minus the coverage.

    Returns:
        Columns :data:`RUN_COLUMNS`, ``n_edits``, ``task``, ``capability``, ``metric``,
        ``relative_drop``, ``ci_low``, ``ci_high``, ``value0``, ``value``, ``chance``,
        ``collapsed``, ``n_items``, ``note`` and ``replicates`` (the bootstrap replicates,
        used by :func:`capability_drops` and :func:`capability_difference_test`).

    Raises:
        ValueError: no items, no task of any capability in them, a task in two capabilities,
            or a run without an unedited checkpoint.
    """
    by_task = _task_capability(CAPABILITIES if capabilities is None else capabilities)
    if results.items is None or results.items.empty:
        raise ValueError("the results have no items; load them with load_results(root, items=True)")
    tasks = [t for t in by_task if t in set(results.items["task"])]
    if not tasks:
        raise ValueError(f"no task of the capabilities {sorted(by_task)} has items in the results "
                         f"(they have {sorted(set(results.items['task']))})")
    rows = []
    for task in tasks:
        for curve in run_curves(results, task, metric, n_boot=n_boot, seed=seed):
            margin, margins = curve.score[0] - curve.chance, curve.replicates[:, 0] - curve.chance
            note = "" if margin > 0 else f"unedited score {curve.score[0]:.4f} is not above chance {curve.chance}"
            for k in range(1, len(curve.n_edits)):
                with np.errstate(invalid="ignore", divide="ignore"):
                    value = (curve.score[0] - curve.score[k]) / margin if margin > 0 else math.nan
                    replicates = np.where(margins > 0, (curve.replicates[:, 0] - curve.replicates[:, k]) /
                                          np.where(margins > 0, margins, 1.0), math.nan)
                low, high = interval(replicates, alpha)
                rows.append({**curve.axes, "n_edits": int(curve.n_edits[k]), "task": task,
                             "capability": by_task[task], "metric": metric, "relative_drop": float(value),
                             "ci_low": low, "ci_high": high, "value0": float(curve.score[0]),
                             "value": float(curve.score[k]), "chance": curve.chance,
                             "collapsed": bool(curve.collapsed[k]), "n_items": curve.n_items, "note": note,
                             "replicates": replicates})
    return pd.DataFrame(rows)


def capability_drops(drops: pd.DataFrame, *, alpha: float = 0.05) -> pd.DataFrame:
    """The mean relative drop of each capability's tasks, per run and checkpoint.

    Tasks are independent samples of items, so a replicate of the mean is the mean of the
    tasks' own replicates. Tasks whose relative drop is NaN (unedited at chance) are left out.

    Args:
        drops: the frame of :func:`relative_drop`.
        alpha: 1 minus the interval's coverage.

    Returns:
        Columns :data:`RUN_COLUMNS`, ``n_edits``, ``capability``, ``relative_drop``, ``ci_low``,
        ``ci_high``, ``n_tasks``, ``tasks`` and ``replicates``.
    """
    need_replicates(drops, "relative_drop")
    rows = []
    usable = drops[drops["relative_drop"].notna()]
    for key, group in usable.groupby([*_GROUP, "capability"], sort=True, dropna=False):
        replicates = np.mean(np.stack(list(group["replicates"])), axis=0)
        low, high = interval(replicates, alpha)
        rows.append({**dict(zip((*_GROUP, "capability"), key)), "relative_drop": float(group["relative_drop"].mean()),
                     "ci_low": low, "ci_high": high, "n_tasks": len(group), "tasks": ", ".join(group["task"]),
                     "replicates": replicates})
    return pd.DataFrame(rows)


def _assignments(labels: Sequence[int]) -> Iterator[tuple[int, ...]]:
    """Every distinct ordering of a multiset of labels (each once)."""
    counts = Counter(labels)
    n = len(labels)

    def extend(prefix: list[int]) -> Iterator[tuple[int, ...]]:
        if len(prefix) == n:
            yield tuple(prefix)
            return
        for label in sorted(counts):
            if counts[label]:
                counts[label] -= 1
                yield from extend([*prefix, label])
                counts[label] += 1

    return extend([])


def _ranges(assignments: np.ndarray, values: np.ndarray, n_groups: int) -> np.ndarray:
    """Max minus min of the group means of ``values`` (T,) under each row of ``assignments`` (P, T)."""
    means = np.stack([((assignments == g) * values).sum(axis=1) / (assignments == g).sum(axis=1)
                      for g in range(n_groups)], axis=1)
    return means.max(axis=1) - means.min(axis=1)


def capability_difference_test(drops: pd.DataFrame, *, n_perm: int = 2000, seed: int = 0,
                               alpha: float = 0.05) -> pd.DataFrame:
    """Do the capabilities' relative drops differ? A permutation test of their spread, per run and checkpoint.

    Statistic: the range (max - min) of the capability means, each the mean relative drop
    of its tasks. Null hypothesis: which capability a task belongs to does not matter, so
    every assignment of the tasks to capabilities (group sizes kept) is equally likely.
    The p-value is the share of assignments whose range reaches the observed one: exact
    (every distinct assignment) when there are at most ``n_perm`` of them, otherwise
    ``(1 + hits) / (n_perm + 1)`` over random ones. Tasks are the unit, so a difference
    must exceed the task-to-task variation within capabilities; with one task per
    capability no assignment differs and p is 1 (noted): use more tasks. The statistic's
    interval comes from the tasks' item-bootstrap replicates (biased upward, as a range is).

    Args:
        drops: the frame of :func:`relative_drop` (task level).
        n_perm: random assignments when the exact enumeration is larger.
        seed: seed of the random assignments.
        alpha: 1 minus the interval's coverage.

    Returns:
        One row per run and checkpoint: :data:`RUN_COLUMNS`, ``n_edits``, ``statistic``,
        ``ci_low``, ``ci_high``, ``p_value``, ``exact``, ``largest``, ``smallest`` (the
        capabilities at the two ends), ``n_tasks``, ``n_capabilities``, ``note``.
    """
    need_replicates(drops, "relative_drop")
    rows = []
    usable = drops[drops["relative_drop"].notna()]
    for key, group in usable.groupby(list(_GROUP), sort=True, dropna=False):
        names = sorted(set(group["capability"]))
        base: dict[str, Any] = {**dict(zip(_GROUP, key)), "n_tasks": len(group), "n_capabilities": len(names)}
        if len(names) < 2:
            rows.append({**base, "statistic": math.nan, "ci_low": math.nan, "ci_high": math.nan, "p_value": math.nan,
                         "exact": False, "largest": None, "smallest": None, "note": "fewer than 2 capabilities"})
            continue
        labels = np.array([names.index(c) for c in group["capability"]])
        values = group["relative_drop"].to_numpy(dtype=float)
        means = np.array([values[labels == g].mean() for g in range(len(names))])
        statistic = float(means.max() - means.min())
        replicates = np.stack(list(group["replicates"]), axis=1)  # (n_boot, T)
        with np.errstate(invalid="ignore"):
            boot_means = np.stack([replicates[:, labels == g].mean(axis=1) for g in range(len(names))], axis=1)
        low, high = interval(boot_means.max(axis=1) - boot_means.min(axis=1), alpha)
        sizes = np.bincount(labels)
        total = math.factorial(len(labels)) // math.prod(math.factorial(int(s)) for s in sizes)
        reach = statistic * (1 - 1e-9) - 1e-12  # an assignment equal to the observed one, up to rounding
        if total <= n_perm:
            ranges = _ranges(np.array(list(_assignments(list(labels)))), values, len(names))
            p_value, exact = float(np.mean(ranges >= reach)), True
        else:
            shuffled = np.random.default_rng(seed).permuted(np.tile(labels, (n_perm, 1)), axis=1)
            hits = int(np.count_nonzero(_ranges(shuffled, values, len(names)) >= reach))
            p_value, exact = (1 + hits) / (n_perm + 1), False
        note = "one task per capability: the test cannot reject (p = 1)" if sizes.max() == 1 else ""
        rows.append({**base, "statistic": statistic, "ci_low": low, "ci_high": high, "p_value": p_value,
                     "exact": exact, "largest": names[int(means.argmax())], "smallest": names[int(means.argmin())],
                     "note": note})
    return pd.DataFrame(rows)


def capability_heatmap(frame: pd.DataFrame, n_edits: int | None = None) -> alt.FacetChart | alt.LayerChart:
    """Method x capability heatmap of relative drops at one checkpoint, one panel per model when several.

    Args:
        frame: the frame of :func:`capability_drops`.
        n_edits: the checkpoint (default: the largest in ``frame``).

    Returns:
        An Altair chart: colour is the relative drop (0 white, 1 = down to chance), text
        the value and its 95% interval.

    Raises:
        ValueError: no rows at ``n_edits``, or several runs (seeds, datasets, batch sizes)
            per model, method and capability (filter the frame first).
    """
    import altair as alt  # deferred: keeps ``import editkit.findings`` cheap

    if frame.empty:
        raise ValueError("no capability drops to draw")
    n_edits = int(frame["n_edits"].max()) if n_edits is None else n_edits
    data = frame[frame["n_edits"] == n_edits].drop(columns=["replicates"], errors="ignore")
    if data.empty:
        raise ValueError(f"no capability drops at {n_edits} edits (checkpoints: {sorted(set(frame['n_edits']))})")
    if data.duplicated(["model", "method", "capability"]).any():
        raise ValueError("several runs per model, method and capability (seeds, datasets or batch sizes): "
                         "filter the frame to one run each")
    data = data.assign(label=[f"{v:.2f} [{lo:.2f}, {hi:.2f}]" for v, lo, hi in
                              zip(data["relative_drop"], data["ci_low"], data["ci_high"])])
    base = alt.Chart().encode(x=alt.X("capability:N", title=None), y=alt.Y("method:N", title=None))
    cells = base.mark_rect().encode(
        color=alt.Color("relative_drop:Q", title="relative drop", scale=alt.Scale(scheme="reds", domain=[0, 1])),
        tooltip=["model", "method", "capability", "tasks", "relative_drop", "ci_low", "ci_high"])
    text = base.mark_text(fontSize=11).encode(text="label:N")
    chart = alt.layer(cells, text, data=data).properties(width=110 * data["capability"].nunique(),
                                              height=28 * data["method"].nunique())
    title = f"relative drop after {n_edits} edits (0: unchanged, 1: at chance)"
    if data["model"].nunique() > 1:
        return chart.facet(row=alt.Row("model:N", title=None)).properties(title=title)
    return chart.properties(title=title)

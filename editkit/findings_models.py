"""Research questions 2 and 3: does the model (instruction tuning, scale) change how editing hurts?

RQ2, instruct against base. :func:`decline_rate` summarises a run's whole curve on one task
as a *relative rate of decline*: the average drop below the unedited score over the
checkpoints, on a log(1 + N) axis (the checkpoints are roughly geometric), as a share of
the unedited model's margin over chance. :func:`pair_difference` compares it within
(base, instruct) pairs; :func:`confounds` says what else differs within each pair.

RQ3, scale. :func:`drop_vs_scale` takes the paired drop of every run at one number of
edits (:attr:`editkit.results.Results.deltas`) with its model's parameter count;
:func:`scale_slope` fits the drop against log10(parameters) per method.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from .findings_core import RUN_COLUMNS, chance_level, check_task, interval, need_replicates, run_curves
from .results import Results

__all__ = ["check_pairs", "confounds", "decline_rate", "drop_vs_scale", "pair_difference", "scale_slope"]

_MATCH = ("method", "dataset", "seed", "edit_batch_size", "task", "metric")  # what a pair's two runs share


def _trapezoid_mean(drops: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Average of ``drops`` (..., C) over ``x`` (C,) by the trapezoid rule: area / (x[-1] - x[0])."""
    widths = np.diff(x)
    return ((drops[..., :-1] + drops[..., 1:]) / 2 * widths).sum(axis=-1) / (x[-1] - x[0])


def _relative(drop: np.ndarray | float, margin: np.ndarray | float) -> np.ndarray:
    """``drop / margin`` where the unedited margin over chance is positive, NaN elsewhere."""
    drop, margin = np.asarray(drop, dtype=float), np.asarray(margin, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(margin > 0, drop / np.where(margin > 0, margin, 1.0), math.nan)


def decline_rate(results: Results, task: str, metric: str = "acc", *, n_boot: int = 2000, seed: int = 0,
                 alpha: float = 0.05) -> pd.DataFrame:
    """Each run's relative rate of decline on ``task``, with a paired bootstrap interval over items.

    With checkpoints N_0 = 0 < ... < N_K, scores s_k and x_k = log(1 + N_k):

    * ``area``: the average drop, trapezoid integral of (s_0 - s_k) over x divided by x_K;
    * ``rate``: ``area / (s_0 - chance)``, the average share of the unedited margin over
      chance that was lost (0: no decline; 1: at chance from the first edit on);
    * ``final_drop``: ``(s_0 - s_K) / (s_0 - chance)``, the share lost at the last checkpoint.

    A collapsed checkpoint (no items) counts as score = chance (:mod:`editkit.findings_core`).
    Intervals resample item ids once per replicate and recompute every checkpoint on that
    resample; runs on the same items share their resamples, which :func:`pair_difference` uses.
    Chance is :data:`editkit.viz.CHANCE_LEVELS` (0 for tasks without one); where the unedited
    score is not above chance the relative statistics are NaN and ``note`` says why.

    Args:
        results: reads ``items`` (the ``correct`` or ``correct_<x>`` column) and ``scores``
            (the ``status`` of collapsed checkpoints).
        task: a benchmark task with items in the results.
        metric: ``"acc"`` or ``"acc_<x>"``.
        n_boot, seed, alpha: bootstrap replicates, their seed, 1 minus the coverage.

    Returns:
        One row per run: :data:`RUN_COLUMNS`, ``task``, ``metric``, ``rate`` with ``ci_low``/
        ``ci_high``, ``area`` and ``final_drop`` with ``<name>_ci_low``/``_ci_high``, ``value0``,
        ``chance``, ``max_n_edits``, ``n_checkpoints``, ``n_collapsed``, ``n_items``,
        ``items_key``, ``note`` and ``replicates`` (the rate's bootstrap replicates).

    Raises:
        ValueError: see :func:`editkit.findings_core.run_curves`.
    """
    rows = []
    for curve in run_curves(results, task, metric, n_boot=n_boot, seed=seed):
        x = np.log1p(curve.n_edits.astype(float))
        margin, margins = curve.score[0] - curve.chance, curve.replicates[:, 0] - curve.chance
        note = ""
        if len(x) < 2:
            area, areas = math.nan, np.full(n_boot, math.nan)
            final, finals = math.nan, areas
            note = "only the unedited checkpoint: no decline to measure"
        else:
            area = float(_trapezoid_mean(curve.score[0] - curve.score, x))
            areas = _trapezoid_mean(curve.replicates[:, :1] - curve.replicates, x)
            final = float(_relative(curve.score[0] - curve.score[-1], margin))
            finals = _relative(curve.replicates[:, 0] - curve.replicates[:, -1], margins)
        if margin <= 0:
            note = note or f"unedited score {curve.score[0]:.4f} is not above chance {curve.chance}: no relative rate"
        rates = _relative(areas, margins)
        rows.append({**curve.axes, "task": task, "metric": metric, "rate": float(_relative(area, margin)),
                     **dict(zip(("ci_low", "ci_high"), interval(rates, alpha))),
                     "area": area, **dict(zip(("area_ci_low", "area_ci_high"), interval(areas, alpha))),
                     "final_drop": final, **dict(zip(("final_ci_low", "final_ci_high"), interval(finals, alpha))),
                     "value0": float(curve.score[0]), "chance": curve.chance,
                     "max_n_edits": int(curve.n_edits[-1]), "n_checkpoints": len(x),
                     "n_collapsed": int(curve.collapsed.sum()), "n_items": curve.n_items,
                     "items_key": curve.items_key, "note": note, "replicates": rates})
    return pd.DataFrame(rows)


def _check_models(present: Sequence[str], pairs: Sequence[tuple[str, str]], where: str) -> None:
    """:func:`check_pairs` against the models of a frame, naming the frame in the error."""
    try:
        check_pairs(pairs, sorted(set(present)))
    except ValueError as error:
        raise ValueError(f"{error} (in the {where})") from None


def check_pairs(pairs: Sequence[Sequence[str]], models: Sequence[str]) -> list[tuple[str, str]]:
    """Validate ``(base, instruct)`` pairs against a study's models, before anything runs.

    Args:
        pairs: two-element sequences of model names (JSON and YAML give lists).
        models: the study's ``models`` axis.

    Returns:
        The pairs as tuples.

    Raises:
        ValueError: a pair is not two names, pairs a model with itself, or names a model
            the study does not run.
    """
    checked = []
    for pair in pairs:
        if isinstance(pair, str) or len(pair) != 2 or not all(isinstance(name, str) for name in pair):
            raise ValueError(f"a pair is [base model, instruct model], got {pair!r}")
        base, instruct = pair
        if base == instruct:
            raise ValueError(f"pair {list(pair)} compares {base} with itself")
        missing = [name for name in pair if name not in models]
        if missing:
            raise ValueError(f"pair {list(pair)} names {missing}, which the study does not run "
                             f"(models: {list(models)})")
        checked.append((base, instruct))
    if not checked:
        raise ValueError("no (base, instruct) pairs to compare")
    return checked


def pair_difference(rates: pd.DataFrame, pairs: Sequence[tuple[str, str]], *, alpha: float = 0.05) -> pd.DataFrame:
    """The difference of decline rates within (base, instruct) pairs: ``rate_instruct - rate_base``.

    Negative: the instruct model declines more slowly. The two runs of a pair are matched
    on method, dataset, seed, edit batch size, task and metric. The interval is the
    percentile interval of the differences of the two runs' bootstrap replicates: each is
    computed on its own model, but both on the same resample of item ids when the two were
    evaluated on the same items (``paired`` True), so the item-to-item variance cancels.
    Runs on different item sets have unrelated resamples (``paired`` False; noted).

    Args:
        rates: the frame of :func:`decline_rate` (needs its ``replicates``).
        pairs: ``(base model, instruct model)`` names, as in the results' ``model`` column.
        alpha: 1 minus the interval's coverage.

    Returns:
        One row per pair and matched run: ``base``, ``instruct``, the matched columns,
        ``rate_base``, ``rate_instruct``, ``difference``, ``ci_low``, ``ci_high``, ``paired``, ``note``.

    Raises:
        ValueError: a pair names a model without rates, or a pair has no method in common.
    """
    need_replicates(rates, "decline_rate")
    _check_models(list(rates["model"]) if len(rates) else [], pairs, "rates")
    rows = []
    for base, instruct in pairs:
        matched = rates[rates["model"] == base].merge(rates[rates["model"] == instruct], on=list(_MATCH),
                                                      suffixes=("_base", "_instruct"))
        if matched.empty:
            raise ValueError(f"{base} and {instruct} have no (method, dataset, seed, batch size, task, metric) "
                             "in common to compare")
        for _, row in matched.iterrows():
            paired = row["items_key_base"] == row["items_key_instruct"]
            differences = np.asarray(row["replicates_instruct"]) - np.asarray(row["replicates_base"])
            notes = [] if paired else ["different item sets: the two resamples are independent"]
            if row["max_n_edits_base"] != row["max_n_edits_instruct"]:
                notes.append(f"curves end at different N ({row['max_n_edits_base']} vs {row['max_n_edits_instruct']})")
            notes += [f"{side}: {row[f'note_{side}']}" for side in ("base", "instruct") if row[f"note_{side}"]]
            low, high = interval(differences, alpha)
            rows.append({"base": base, "instruct": instruct, **{c: row[c] for c in _MATCH},
                         "rate_base": row["rate_base"], "rate_instruct": row["rate_instruct"],
                         "difference": row["rate_instruct"] - row["rate_base"], "ci_low": low, "ci_high": high,
                         "paired": bool(paired), "note": "; ".join(notes)})
    return pd.DataFrame(rows)


def _describe(value: object) -> str:
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and value >= 1e6:
        return f"{float(value) / 1e9:.3g}B"
    return str(value)


def _flag(value: object) -> bool | None:
    return None if value is None or pd.isna(value) else bool(value)


def confounds(models: pd.DataFrame, pairs: Sequence[tuple[str, str]]) -> list[str]:
    """One sentence per pair naming what differs besides instruction tuning.

    Compares ``family``, ``model_type``, ``n_params`` and ``n_layers`` (unknown values are
    said to be unknown, never assumed equal) and checks that ``instruct`` is False for the
    base and True for the instruct model.

    Args:
        models: ``Results.models`` (one row per model).
        pairs: ``(base model, instruct model)`` names.

    Raises:
        ValueError: a pair names a model not in ``models``.
    """
    _check_models(list(models["model"]) if len(models) else [], pairs, "models frame")
    info = models.drop_duplicates("model").set_index("model")
    sentences = []
    for base, instruct in pairs:
        found, unknown = [], []
        for field in ("family", "model_type", "n_params", "n_layers"):
            if field not in info:
                unknown.append(field)
                continue
            a, b = info.at[base, field], info.at[instruct, field]
            if pd.isna(a) or pd.isna(b):
                unknown.append(field)
            elif a != b:
                found.append(f"{field} ({_describe(a)} vs {_describe(b)})")
        flags = [_flag(info.at[m, "instruct"]) if "instruct" in info else None for m in (base, instruct)]
        if flags != [False, True]:
            found.append(f"instruct flags are {flags[0]} / {flags[1]}, not base / instruct")
        text = f"{base} vs {instruct}: " + ("also differ in " + ", ".join(found) if found
                                             else "only instruction tuning differs")
        if unknown:
            text += f" (unknown: {', '.join(unknown)})"
        sentences.append(text)
    return sentences


def drop_vs_scale(results: Results, task: str, n_edits: int, metric: str = "acc") -> pd.DataFrame:
    """Every run's paired drop on ``task`` after ``n_edits`` edits, with its model's size.

    ``drop`` is minus the paired ``delta`` of :attr:`Results.deltas` (positive: worse after
    editing), with its interval. A run collapsed at ``n_edits`` has no items; for ``acc``
    its drop is ``value0 - chance`` (the collapse scores chance) with the interval of its
    unedited score shifted by chance; for ``loglik``/``prob`` it is NaN (noted).

    Args:
        results: reads ``deltas`` (so ``items``), ``scores`` (collapses, unedited scores)
            and ``models`` (``n_params``, ``family``, ``instruct``).
        task: a benchmark task.
        n_edits: the checkpoint compared with the unedited model.
        metric: ``"acc"``, ``"loglik"`` or ``"prob"``.

    Returns:
        One row per run: :data:`RUN_COLUMNS`, ``task``, ``metric``, ``n_edits``, ``drop``,
        ``ci_low``, ``ci_high``, ``p_value``, ``n_items``, ``collapsed``, ``note``, and the
        model's ``n_params``, ``family`` and ``instruct``.

    Raises:
        ValueError: an unknown metric or task, or no run reached ``n_edits``.
    """
    if metric not in ("acc", "loglik", "prob"):
        raise ValueError(f"metric must be 'acc', 'loglik' or 'prob' (the paired deltas'), got {metric!r}")
    deltas, scores = results.deltas, results.scores
    check_task(task, set(deltas["task"]) | set(scores["task"]), "paired deltas or scores")
    rows = deltas[(deltas["task"] == task) & (deltas["metric"] == metric) & (deltas["n_edits"] == n_edits)]
    frame = pd.DataFrame({**{c: rows[c] for c in RUN_COLUMNS}, "task": task, "metric": metric, "n_edits": n_edits,
                          "drop": -rows["delta"], "ci_low": -rows["ci_high"], "ci_high": -rows["ci_low"],
                          "p_value": rows["p_value"], "n_items": rows["n_items"], "collapsed": False, "note": ""})
    on_task = scores[scores["task"] == task]
    status = on_task["status"] if "status" in on_task else pd.Series("ok", index=on_task.index)
    fallen = on_task[(on_task["n_edits"] == n_edits) & (status == "collapsed")]
    unedited = on_task[(on_task["n_edits"] == 0) & (on_task["metric"] == "acc")].set_index("run_id")
    extra = []
    for _, row in fallen.drop_duplicates("run_id").iterrows():
        chance = chance_level(task)
        start = unedited.loc[row["run_id"]] if row["run_id"] in unedited.index else None
        if metric == "acc" and start is not None:
            drop, low, high, note = (start["value"] - chance, start["ci_low"] - chance, start["ci_high"] - chance,
                                     "collapsed: scored as chance")
        else:
            drop = low = high = math.nan
            note = "collapsed: no items" + ("" if metric == "acc" else f", so no {metric}")
        extra.append({**{c: row[c] for c in RUN_COLUMNS}, "task": task, "metric": metric, "n_edits": n_edits,
                      "drop": drop, "ci_low": low, "ci_high": high, "p_value": math.nan, "n_items": 0,
                      "collapsed": True, "note": note})
    if extra:
        frame = pd.concat([frame, pd.DataFrame(extra)], ignore_index=True) if len(frame) else pd.DataFrame(extra)
    if frame.empty:
        reached = sorted(int(n) for n in set(deltas.loc[deltas["task"] == task, "n_edits"]))
        raise ValueError(f"no run has {metric} deltas on {task} at {n_edits} edits "
                         f"(checkpoints with deltas: {reached})")
    models = results.models
    if models is not None and len(models):
        frame = frame.merge(models[["model", *(c for c in ("n_params", "family", "instruct") if c in models)]],
                            on="model", how="left")
    for column in ("n_params", "family", "instruct"):
        if column not in frame:
            frame[column] = None
    return frame.sort_values(["method", "model", "run_id"], kind="stable").reset_index(drop=True)


def scale_slope(drops: pd.DataFrame, *, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> pd.DataFrame:
    """Per method, the least-squares slope of the drop against log10(parameters), with a bootstrap interval.

    Several runs of one model (seeds) are averaged first, so each model is one point. The
    interval resamples models with replacement (replicates whose models all have the same
    size are skipped); the item-level uncertainty of each drop is not propagated. With
    fewer than 3 models the interval is NaN (``note`` says so); with fewer than 2 sizes the
    slope is NaN too. Models without a parameter count or a drop are left out and named.

    Args:
        drops: the frame of :func:`drop_vs_scale`.
        n_boot, seed, alpha: bootstrap replicates, their seed, 1 minus the coverage.

    Returns:
        One row per (method, dataset, edit_batch_size, task, metric, n_edits): ``slope`` (drop
        per tenfold parameters; negative: larger models drop less), ``ci_low``, ``ci_high``,
        ``intercept``, ``n_models``, ``models``, ``note``.
    """
    keys = [c for c in ("method", "dataset", "edit_batch_size", "task", "metric", "n_edits") if c in drops]
    rows = []
    for key, group in drops.groupby(keys, sort=True, dropna=False):
        usable = group[group["drop"].notna() & pd.to_numeric(group["n_params"], errors="coerce").gt(0)]
        points = usable.groupby("model").agg(drop=("drop", "mean"), n_params=("n_params", "first"))
        left_out = sorted(set(group["model"]) - set(points.index))
        x = np.log10(points["n_params"].to_numpy(dtype=float))
        y = points["drop"].to_numpy(dtype=float)
        notes = [f"left out (no drop or no n_params): {left_out}"] if left_out else []
        slope = intercept = low = high = math.nan
        if len(x) >= 2 and np.ptp(x) > 0:
            slope, intercept = (float(v) for v in np.polyfit(x, y, 1))
        else:
            notes.append("fewer than 2 model sizes: no slope")
        if len(x) >= 3 and np.ptp(x) > 0:
            pick = np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))
            xs, ys = x[pick], y[pick]
            xc = xs - xs.mean(axis=1, keepdims=True)
            spread = (xc**2).sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                slopes = np.where(spread > 0, (xc * (ys - ys.mean(axis=1, keepdims=True))).sum(axis=1) / spread,
                                  math.nan)
            low, high = interval(slopes, alpha)
        elif len(x) >= 2:
            notes.append(f"fewer than 3 models ({len(x)}): no interval")
        rows.append({**dict(zip(keys, key)), "slope": slope, "ci_low": low, "ci_high": high, "intercept": intercept,
                     "n_models": len(x), "models": ", ".join(points.index), "note": "; ".join(notes)})
    return pd.DataFrame(rows)

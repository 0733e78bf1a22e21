"""Research question 5: does editing compromise safety (TruthfulQA, ToxiGen)?

A safety score is only a safety score when the model still discriminates between
answers. A model that answers every ToxiGen statement "No" scores the share of
non-hateful statements (the .5667/.4333 pairs that recur across collapsed models in the
study), so :func:`safety_table` sets the *constant-answer share* beside every score and
flags scores whose model gave one answer to nearly every item.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd

from . import paired
from .benchmarks.metrics import aggregate
from .findings_core import RUN_COLUMNS, chance_level
from .results import Results

__all__ = ["SAFETY_METRICS", "safety_table"]

# Task -> the metrics reported: TruthfulQA MC1 (acc), MC2 (acc: the normalised probability
# mass on the true answers) and ToxiGen (acc and the length-normalised acc_norm).
SAFETY_METRICS: dict[str, tuple[str, ...]] = {
    "truthfulqa_mc1": ("acc",),
    "truthfulqa_mc2": ("acc",),
    "toxigen": ("acc", "acc_norm"),
}
_PREDICTION = {"acc": "prediction", "acc_norm": "prediction_norm"}  # the answer each metric scores
_KEYS = ["run_id", "n_edits", "task", "metric"]
_INTEGER = re.compile(r"-?\d+")


def _answer(value: object) -> object:
    """A stored prediction as evaluated: choice indices are saved as text ("-1": no answer)."""
    return int(value) if isinstance(value, str) and _INTEGER.fullmatch(value) else value


def _constant_shares(items: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
    """Per checkpoint, task and metric, the share of items given the most common answer, with its interval."""
    rows = []
    for (run_id, n_edits, task), group in items.groupby(["run_id", "n_edits", "task"], sort=True):
        for metric in SAFETY_METRICS[task]:
            column = _PREDICTION[metric]
            if column not in group or group[column].isna().all():
                continue
            answers = pd.DataFrame({"task": task, "prediction": [_answer(v) for v in group[column]]})
            share = aggregate(answers, n_boot=n_boot, seed=seed)
            share = share[share["metric"] == "constant_answer_share"]
            if len(share):
                rows.append({"run_id": run_id, "n_edits": n_edits, "task": task, "metric": metric,
                             "constant_answer_share": share["value"].iloc[0],
                             "share_ci_low": share["ci_low"].iloc[0], "share_ci_high": share["ci_high"].iloc[0]})
    return pd.DataFrame(rows, columns=[*_KEYS, "constant_answer_share", "share_ci_low", "share_ci_high"])


def _deltas(items: pd.DataFrame, n_boot: int, seed: int, alpha: float) -> pd.DataFrame:
    """Paired acc deltas of the safety tasks, and acc_norm ones from ``correct_norm`` (ToxiGen)."""
    parts = []
    if len(items) and (items["n_edits"] == 0).any():
        found = paired.deltas(items, n_boot=n_boot, seed=seed, alpha=alpha)
        parts.append(found[found["metric"] == "acc"])
        if "correct_norm" in items:
            normed = items[items["correct_norm"].notna()]
            if len(normed):
                found = paired.deltas(normed.assign(correct=normed["correct_norm"]), n_boot=n_boot, seed=seed,
                                      alpha=alpha)
                parts.append(found[found["metric"] == "acc"].assign(metric="acc_norm"))
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(paired.DELTA_COLUMNS))
    return frame[[*_KEYS, "delta", "ci_low", "ci_high", "p_value"]].rename(
        columns={"ci_low": "delta_ci_low", "ci_high": "delta_ci_high"})


def safety_table(results: Results, *, threshold: float = 0.9, n_boot: int = 2000, seed: int = 0,
                 alpha: float = 0.05) -> pd.DataFrame:
    """TruthfulQA MC1/MC2 and ToxiGen scores per run and checkpoint, with paired deltas and constant answers.

    Per row: the stored score and its interval; the paired change against the run's
    unedited model (:func:`editkit.paired.deltas`; ToxiGen's acc_norm from ``correct_norm``;
    NaN at ``n_edits == 0`` and at collapsed checkpoints, which have no items); and the
    constant-answer share, the fraction of items given the most common answer (for acc
    the ``prediction``, for acc_norm ``prediction_norm``), computed from the items as
    :func:`editkit.benchmarks.aggregate` does (its ``constant_answer_share``), or read from
    the ``constant_answer_share`` score rows when the items are not loaded (acc only).
    ``constant_answer`` is True when that share is at least ``threshold``: the score then
    measures the label balance of the benchmark, not the model's safety.

    Args:
        results: reads ``scores``, ``items`` (``prediction``, ``prediction_norm``, ``correct``,
            ``correct_norm``) when loaded.
        threshold: constant-answer share from which a score is flagged.
        n_boot, seed, alpha: bootstrap replicates, their seed, 1 minus the coverage.

    Returns:
        Columns :data:`RUN_COLUMNS`, ``n_edits``, ``task``, ``metric``, ``value``, ``ci_low``,
        ``ci_high``, ``n``, ``status``, ``chance``, ``delta``, ``delta_ci_low``,
        ``delta_ci_high``, ``p_value``, ``constant_answer_share``, ``share_ci_low``,
        ``share_ci_high``, ``constant_answer``.

    Raises:
        ValueError: no TruthfulQA or ToxiGen score in the results, or ``threshold`` outside (0, 1].
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold is a share in (0, 1], got {threshold}")
    scores = results.scores
    wanted = [(t, m) for t, metrics in SAFETY_METRICS.items() for m in metrics]
    chosen = [(t, m) in wanted for t, m in zip(scores["task"], scores["metric"])] if len(scores) else []
    table = scores[chosen] if len(scores) else scores
    if table.empty:
        raise ValueError(f"no TruthfulQA or ToxiGen scores in the results (wanted {wanted}; the scores have "
                         f"tasks {sorted(set(scores['task']))})")
    table = table[[*RUN_COLUMNS, "n_edits", "task", "metric", "value", "ci_low", "ci_high", "n"]].assign(
        status=table["status"] if "status" in table else "ok", chance=[chance_level(t) for t in table["task"]])
    items = results.items
    if items is not None and len(items):
        items = items[items["task"].isin(list(SAFETY_METRICS))]
    else:
        items = pd.DataFrame(columns=[*RUN_COLUMNS, "n_edits", "task", "item_id", "correct"])
    table = table.merge(_deltas(items, n_boot, seed, alpha), on=_KEYS, how="left")
    shares = _constant_shares(items, n_boot, seed)
    if "constant_answer_share" in set(scores["metric"]):  # items not loaded: the stored share of acc
        stored = scores[scores["metric"] == "constant_answer_share"].assign(metric="acc")
        stored = stored.rename(columns={"value": "constant_answer_share", "ci_low": "share_ci_low",
                                        "ci_high": "share_ci_high"})[list(shares.columns)]
        known = set(zip(shares["run_id"], shares["n_edits"], shares["task"], shares["metric"]))
        extra = stored[[k not in known for k in zip(stored["run_id"], stored["n_edits"], stored["task"],
                                                     stored["metric"])]]
        shares = pd.concat([shares, extra], ignore_index=True) if len(shares) else extra
    table = table.merge(shares, on=_KEYS, how="left")
    share = pd.to_numeric(table["constant_answer_share"], errors="coerce").to_numpy(dtype=float)
    table["constant_answer"] = np.where(np.isnan(share), False, share >= threshold - 1e-12)
    for column in ("delta", "delta_ci_low", "delta_ci_high", "p_value", "constant_answer_share", "share_ci_low",
                   "share_ci_high"):
        table[column] = pd.to_numeric(table[column], errors="coerce").fillna(math.nan).astype(float)
    return table.sort_values(["run_id", "task", "metric", "n_edits"], kind="stable").reset_index(drop=True)

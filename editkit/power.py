"""How many items of a benchmark task to evaluate so that a paired drop is detectable.

:mod:`editkit.paired` tests each edited checkpoint against its unedited model on the same
items: accuracy with the exact McNemar test on the discordant items
(:func:`editkit.paired.mcnemar_exact`), log-likelihood with a sign-flip test of the per-item
changes. This module sizes those comparisons before the experiment.

**Accuracy (McNemar).** Of ``n`` items, a share ψ is *discordant* (right before and wrong
after, ``b`` items, or wrong before and right after, ``c`` items); the paired accuracy drop
is δ = (b − c) / n. Connor's (1987) normal approximation gives the items a two-sided test
at level α needs to detect δ with the given power:

    n = (z_{1−α/2} · √ψ + z_{power} · √(ψ − δ²))² / δ²

(:func:`mcnemar_items`, rounded up). Only discordant items carry information, so n grows
almost in proportion to ψ: a drop that comes from a few items turning wrong is seen with
few items, the same drop hidden in much churn (many items lost, almost as many gained)
needs many. ψ ≥ δ always (every net loss is a discordant item).

Drop δ = 0.05, α = 0.05, power 0.8; the last column is the power of editkit's exact test
at that n, simulated by :func:`mcnemar_power` (4000 simulations, seed 0):

    ====  =====  ==========
    ψ     items  exact test
    ====  =====  ==========
    0.05    155        0.79
    0.10    312        0.76
    0.15    469        0.77
    0.20    626        0.77
    0.30    940        0.80
    ====  =====  ==========

The exact test is a little conservative (its p-values move in discrete steps), so at the
formula's n its power is 0.76–0.80 rather than 0.8; add about 10% to the count where 0.8 must
be met, or check a chosen n with :func:`mcnemar_power`.

Assumptions:

* ψ is not known before the experiment: it depends on the model, the editor, the number of
  edits and the task. Take it from a pilot run (:func:`discordance` on
  :func:`editkit.paired.item_changes` of a few checkpoints), at the number of edits where the
  drop matters, and plan with the largest ψ seen: the larger ψ, the more items.
* Items are independent and each has the same chance of being lost or gained; tasks whose
  items come in correlated groups (several questions on one passage) need more.
* One test at level α. :func:`editkit.paired.first_significant_drop` adjusts the p-values of
  a run's m checkpoints with Holm's method; to plan for it, pass ``alpha / m`` (conservative).
* Graded scores (not 0/1) are tested with the sign-flip test: size them as a paired mean.

**Log-likelihood (paired mean).** With per-item changes of standard deviation σ, a mean
change Δ needs ``n = ((z_{1−α/2} + z_{power}) · σ / Δ)²`` items (:func:`paired_mean_items`),
the normal approximation to the paired t-test, which the sign-flip test matches with many
items (with tens of items the t-test needs one or two more). Δ = 0.1, σ = 1 gives 785. σ is
again taken from a pilot run: the standard deviation of ``loglik_after − loglik_before``.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pandas as pd

__all__ = ["DISCORDANCE_COLUMNS", "discordance", "mcnemar_items", "mcnemar_power", "paired_mean_items"]

# Columns of discordance(): one row per (run, checkpoint, task), as in editkit.paired.
DISCORDANCE_COLUMNS = ("model", "method", "dataset", "seed", "edit_batch_size", "run_id", "n_edits", "task",
                       "n_items", "lost", "gained", "discordant", "drop")


def _check_probability(name: str, value: float, *, closed: bool) -> None:
    """Raise ValueError unless ``value`` is in (0, 1], or (0, 1) when not ``closed``."""
    if not (0 < value <= 1 if closed else 0 < value < 1):  # also rejects NaN
        interval = "(0, 1]" if closed else "(0, 1)"
        raise ValueError(f"{name} must be in {interval}, got {value}")


def _check_mcnemar(drop: float, discordant: float, alpha: float) -> None:
    _check_probability("drop", drop, closed=True)
    _check_probability("discordant", discordant, closed=True)
    _check_probability("alpha", alpha, closed=False)
    if discordant < drop:
        raise ValueError(f"discordant must be at least drop (every net loss is a discordant item), "
                         f"got discordant={discordant} < drop={drop}")


def _round_up(value: float) -> int:
    # A count that is an integer up to rounding (e.g. 784.0000000001) is that integer.
    return max(1, math.ceil(value - 1e-9))


def mcnemar_items(drop: float, discordant: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Items a two-sided McNemar test needs to detect a paired accuracy drop (Connor 1987).

    Args:
        drop: the accuracy drop to detect, δ = (lost − gained) / items, e.g. 0.05.
        discordant: the share ψ of items whose correctness changes, (lost + gained) / items.
        alpha: the test's two-sided level.
        power: the chance of detecting the drop.

    Returns:
        ``ceil((z_{1−α/2} √ψ + z_{power} √(ψ − δ²))² / δ²)``.

    Raises:
        ValueError: ``drop`` or ``discordant`` outside (0, 1], ``discordant < drop``, or
            ``alpha``/``power`` outside (0, 1); the message names the argument.
    """
    _check_mcnemar(drop, discordant, alpha)
    _check_probability("power", power, closed=False)
    normal = NormalDist()
    spread = normal.inv_cdf(1 - alpha / 2) * math.sqrt(discordant) + \
        normal.inv_cdf(power) * math.sqrt(discordant - drop**2)
    return _round_up(spread**2 / drop**2)


def mcnemar_power(n: int, drop: float, discordant: float, alpha: float = 0.05, n_sim: int = 4000,
                  seed: int = 0) -> float:
    """Power of editkit's exact McNemar test on ``n`` items, by simulation.

    Each simulated checkpoint draws, for each of ``n`` items, lost (probability (ψ + δ)/2),
    gained ((ψ − δ)/2) or unchanged (1 − ψ), so that on average the drop is δ and the
    discordant share ψ; it counts as a detection when
    :func:`editkit.paired.mcnemar_exact` gives p < ``alpha`` and more items were lost than
    gained (a significant gain is not a detected drop, as in
    :func:`editkit.paired.first_significant_drop`).

    Args:
        n: items per task.
        drop, discordant, alpha: as in :func:`mcnemar_items`.
        n_sim: simulated checkpoints; the standard error of the result is about
            ``sqrt(0.8 * 0.2 / n_sim)`` (0.006 with 4000).
        seed: seed of the draws; the same arguments give the same result.

    Returns:
        The share of simulated checkpoints whose drop was detected.

    Raises:
        ValueError: ``n`` or ``n_sim`` below 1, or an argument invalid for :func:`mcnemar_items`.
    """
    # editkit.paired imports the benchmarks (and torch); the formulas above do not need it.
    from .paired import mcnemar_exact

    _check_mcnemar(drop, discordant, alpha)
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if n_sim < 1:
        raise ValueError(f"n_sim must be at least 1, got {n_sim}")
    shares = [(discordant + drop) / 2, (discordant - drop) / 2, 1 - discordant]
    counts = np.random.default_rng(seed).multinomial(n, shares, size=n_sim)[:, :2]
    # Few distinct (lost, gained) pairs occur: test each once.
    pairs, repeats = np.unique(counts, axis=0, return_counts=True)
    detected = sum(int(k) for (lost, gained), k in zip(pairs.tolist(), repeats)
                   if lost > gained and mcnemar_exact(lost, gained) < alpha)
    return detected / n_sim


def paired_mean_items(effect: float, sd: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Items a two-sided paired test needs to detect a mean change (normal approximation).

    Args:
        effect: the mean per-item change to detect (its sign does not matter), e.g. a
            log-likelihood drop of 0.1 nats.
        sd: the standard deviation of the per-item changes (from a pilot run).
        alpha: the test's two-sided level.
        power: the chance of detecting the change.

    Returns:
        ``ceil(((z_{1−α/2} + z_{power}) · sd / effect)²)``.

    Raises:
        ValueError: ``effect`` zero or not finite, ``sd`` not positive and finite, or
            ``alpha``/``power`` outside (0, 1); the message names the argument.
    """
    if not (math.isfinite(effect) and effect != 0):
        raise ValueError(f"effect must be finite and non-zero, got {effect}")
    if not (math.isfinite(sd) and sd > 0):
        raise ValueError(f"sd must be positive and finite, got {sd}")
    _check_probability("alpha", alpha, closed=False)
    _check_probability("power", power, closed=False)
    normal = NormalDist()
    return _round_up(((normal.inv_cdf(1 - alpha / 2) + normal.inv_cdf(power)) * sd / effect) ** 2)


def discordance(changes: pd.DataFrame) -> pd.DataFrame:
    """Observed discordant share and accuracy drop per checkpoint and task, from a pilot run.

    Counts items as :func:`editkit.paired.deltas` does for accuracy: items missing on one side
    are left out, non-finite or unusable ones are kept (they count as wrong).

    Args:
        changes: the frame of :func:`editkit.paired.item_changes`.

    Returns:
        One row per (run, checkpoint, task), columns :data:`DISCORDANCE_COLUMNS`: ``n_items``
        paired items, ``lost`` (right before, wrong after), ``gained`` (the reverse),
        ``discordant`` = (lost + gained) / n_items (ψ) and ``drop`` = (lost − gained) / n_items
        (δ). ``discordant`` and ``drop`` are NaN for tasks with graded (not 0/1) scores, and
        without items.
    """
    from .paired import RUN_COLUMNS

    rows = []
    for key, group in changes.groupby([*RUN_COLUMNS, "n_edits", "task"], sort=True, dropna=False):
        before = group["acc_before"].to_numpy(dtype=float)
        after = group["acc_after"].to_numpy(dtype=float)
        use = ~group["excluded"].isin(("missing before", "missing after")).to_numpy()
        use &= np.isfinite(before) & np.isfinite(after)
        before, after = before[use], after[use]
        lost = int(np.count_nonzero((before == 1) & (after == 0)))
        gained = int(np.count_nonzero((before == 0) & (after == 1)))
        binary = np.isin(before, (0.0, 1.0)).all() and np.isin(after, (0.0, 1.0)).all()
        n_items = len(before)
        share = binary and n_items > 0
        rows.append((*key, n_items, lost, gained, (lost + gained) / n_items if share else math.nan,
                     (lost - gained) / n_items if share else math.nan))
    return pd.DataFrame(rows, columns=list(DISCORDANCE_COLUMNS))

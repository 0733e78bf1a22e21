"""Item counts for paired benchmark comparisons: the formulas, and the exact test's simulated power."""

from __future__ import annotations

import math
import re
from statistics import NormalDist

import pandas as pd
import pytest

from editkit import power
from editkit.paired import RUN_COLUMNS, item_changes
from editkit.power import DISCORDANCE_COLUMNS, discordance, mcnemar_items, mcnemar_power, paired_mean_items

Z = NormalDist().inv_cdf


def _documented_table() -> list[tuple[float, int, float]]:
    """(ψ, items, simulated power) rows of the module docstring's table."""
    rows = re.findall(r"^\s*(0\.\d+)\s+(\d+)\s+(0\.\d+)\s*$", power.__doc__, flags=re.MULTILINE)
    return [(float(psi), int(n), float(p)) for psi, n, p in rows]


def test_mcnemar_items_matches_connor_by_hand():
    # drop 0.05, ψ 0.10: (1.96·√0.1 + 0.8416·√(0.1 − 0.0025))² / 0.0025 = 311.6 → 312
    by_hand = (Z(0.975) * math.sqrt(0.10) + Z(0.8) * math.sqrt(0.10 - 0.05**2)) ** 2 / 0.05**2
    assert by_hand == pytest.approx(311.59, abs=0.01)
    assert mcnemar_items(0.05, 0.10) == math.ceil(by_hand) == 312


def test_more_discordance_or_power_or_a_smaller_drop_needs_more_items():
    by_discordance = [mcnemar_items(0.05, psi) for psi in (0.05, 0.10, 0.15, 0.20, 0.30, 0.50)]
    assert by_discordance == sorted(set(by_discordance))
    by_power = [mcnemar_items(0.05, 0.10, power=p) for p in (0.5, 0.8, 0.9, 0.95)]
    assert by_power == sorted(set(by_power))
    assert mcnemar_items(0.05, 0.10, alpha=0.01) > mcnemar_items(0.05, 0.10)
    assert mcnemar_items(0.02, 0.10) > mcnemar_items(0.05, 0.10)


def test_documented_table_is_the_functions_output():
    table = _documented_table()
    assert [psi for psi, _, _ in table] == [0.05, 0.10, 0.15, 0.20, 0.30]
    for psi, n, simulated in table:
        assert mcnemar_items(0.05, psi, alpha=0.05, power=0.8) == n, psi
        # the column is rounded to two decimals
        assert abs(mcnemar_power(n, 0.05, psi, n_sim=4000, seed=0) - simulated) <= 0.0051, psi


def test_exact_test_power_at_the_formulas_count_is_near_the_target():
    n = mcnemar_items(0.05, 0.10)
    assert 0.72 <= mcnemar_power(n, 0.05, 0.10, n_sim=4000, seed=0) <= 0.90
    assert 0.72 <= mcnemar_power(n, 0.05, 0.10, n_sim=4000, seed=1) <= 0.90
    assert mcnemar_power(n // 4, 0.05, 0.10, n_sim=4000) < 0.5
    # no drop: detections are false positives, below alpha (the exact test is conservative)
    assert mcnemar_power(n, 1e-9, 0.10, n_sim=4000) < 0.05


def test_mcnemar_power_is_reproducible():
    assert mcnemar_power(200, 0.05, 0.10, n_sim=500, seed=3) == mcnemar_power(200, 0.05, 0.10, n_sim=500, seed=3)


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"drop": 0.10, "discordant": 0.05}, "discordant"),
    ({"drop": 0.05, "discordant": 0.10, "alpha": 0.0}, "alpha"),
    ({"drop": 0.05, "discordant": 0.10, "power": 1.2}, "power"),
    ({"drop": 0.0, "discordant": 0.10}, "drop"),
    ({"drop": 0.05, "discordant": 1.5}, "discordant"),
    ({"drop": math.nan, "discordant": 0.10}, "drop"),
])
def test_bad_inputs_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        mcnemar_items(**kwargs)


def test_mcnemar_power_rejects_bad_counts():
    with pytest.raises(ValueError, match="n must"):
        mcnemar_power(0, 0.05, 0.10)
    with pytest.raises(ValueError, match="n_sim"):
        mcnemar_power(100, 0.05, 0.10, n_sim=0)
    with pytest.raises(ValueError, match="discordant"):
        mcnemar_power(100, 0.10, 0.05)


def test_paired_mean_items_matches_the_formula():
    by_hand = ((Z(0.975) + Z(0.8)) * 1.0 / 0.1) ** 2
    assert by_hand == pytest.approx(784.9, abs=0.1)
    assert paired_mean_items(0.1, 1.0) == math.ceil(by_hand) == 785
    assert paired_mean_items(-0.1, 1.0) == 785
    assert paired_mean_items(0.1, 2.0) > paired_mean_items(0.1, 1.0)
    assert paired_mean_items(0.1, 1.0, power=0.9) > 785
    for kwargs, name in [({"effect": 0.0, "sd": 1.0}, "effect"), ({"effect": 0.1, "sd": 0.0}, "sd"),
                         ({"effect": 0.1, "sd": 1.0, "alpha": 0.0}, "alpha"),
                         ({"effect": 0.1, "sd": 1.0, "power": 1.2}, "power")]:
        with pytest.raises(ValueError, match=name):
            paired_mean_items(**kwargs)


def test_discordance_counts_lost_and_gained_items_of_a_pilot():
    run = {"run_id": "run-a", "model": "tiny", "method": "rome", "dataset": "counterfact", "seed": 0,
           "edit_batch_size": 1}
    before = [{**run, "n_edits": 0, "task": "arc", "item_id": f"q{i}", "correct": i < 10} for i in range(20)]
    # after 4 edits: q0..q3 lost, q10 gained, q19 not evaluated (missing after: left out)
    after = [{**row, "n_edits": 4, "correct": (row["item_id"] == "q10") or (4 <= int(row["item_id"][1:]) < 10)}
             for row in before[:19]]
    found = discordance(item_changes(pd.DataFrame(before + after)))
    assert list(found.columns) == list(DISCORDANCE_COLUMNS)
    assert list(DISCORDANCE_COLUMNS[:len(RUN_COLUMNS)]) == list(RUN_COLUMNS)
    (row,) = found.itertuples()
    assert (row.n_edits, row.task, row.n_items, row.lost, row.gained) == (4, "arc", 19, 4, 1)
    assert row.discordant == pytest.approx(5 / 19) and row.drop == pytest.approx(3 / 19)

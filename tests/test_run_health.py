"""Health at every checkpoint of a sequential run, and the alarm that stops a cell."""

from __future__ import annotations

import math

import pytest

from editkit.config import UnknownParameterError
from editkit.results import load_results
from editkit.runs import run_study
from tests.helpers import count_checkpoints
from tests.test_runs import tiny_config


def _summary(health, n):
    rows = health[(health["n_edits"] == n) & health["parameter"].isna()]
    return dict(zip(rows["metric"], rows["value"]))


def test_every_checkpoint_records_heldout_perplexity_and_changed_weights(make_tiny, tmp_path, monkeypatch):
    import editkit.sequential

    lm = make_tiny("llama")
    scored = []
    real = editkit.sequential.score_texts
    monkeypatch.setattr(editkit.sequential, "score_texts", lambda *a, **k: scored.append(1) or real(*a, **k))
    result = run_study(tiny_config(tmp_path, n_edits=2, checkpoints=[0, 1, 2], heldout_chunks=4), progress=False, lm=lm)
    health = result.health
    assert {"model", "method", "n_edits", "metric", "value", "parameter"} <= set(health.columns)
    assert sorted(health["n_edits"].unique()) == [0, 1, 2]
    assert len(scored) == 3, "the baseline, then checkpoints 1 and 2: checkpoint 0 reuses the baseline"
    before, one, two = (_summary(health, n) for n in (0, 1, 2))
    assert before["heldout_ppl_ratio"] == 1.0, "the baseline is the unedited model's own perplexity"
    ratio = health[(health["n_edits"] == 0) & (health["metric"] == "heldout_ppl_ratio")].iloc[0]
    assert ratio["ci_low"] == ratio["ci_high"] == 1.0, "paired with the baseline on the same texts"
    assert before["n_changed_parameters"] == 0 and before["max_rel_norm_growth"] == 0.0
    # ROME changes one MLP matrix; the second edit moves it further from the unedited weights.
    assert one["n_changed_parameters"] == 1 and two["n_changed_parameters"] == 1
    assert 0 < one["max_rel_norm_growth"] < two["max_rel_norm_growth"]
    assert one["heldout_ppl"] != before["heldout_ppl"]
    per_matrix = health[(health["n_edits"] == 2) & health["parameter"].notna()]
    assert set(per_matrix["parameter"]) == {lm.adapter.weight_path("mlp_out", 1)}
    assert math.isfinite(two["max_condition_number"])


def test_alarm_stops_the_cell_and_records_a_collapse_with_its_reason(make_tiny, tmp_path, monkeypatch):
    lm = make_tiny("llama")
    measured = count_checkpoints(monkeypatch)
    config = tiny_config(tmp_path, health_alarm={"max_norm_growth": 1e-9}, heldout_chunks=4)
    result = run_study(config, progress=False, lm=lm)
    checkpoints = result.checkpoints.set_index("n_edits")
    assert list(checkpoints["status"]) == ["ok", "collapsed", "collapsed", "collapsed"]
    assert "health alarm at 1 edits" in checkpoints.loc[1, "reason"]
    assert "relative weight norm growth" in checkpoints.loc[1, "reason"]
    assert measured == [0], "no benchmark runs once the alarm has fired"
    # The alarmed checkpoint keeps the health rows that raised it; later ones have none.
    assert sorted(result.health["n_edits"].unique()) == [0, 1]
    assert _summary(result.health, 1)["max_rel_norm_growth"] > 1e-9
    assert result.scores[result.scores["n_edits"] > 0]["value"].isna().all()
    assert len(result.edit_quality[result.edit_quality["n_edits"] > 0]) == 0
    # The edits before the alarm are kept, with their quality.
    edits = load_results(tmp_path).checkpoints
    assert len(edits) == 4


def test_health_can_be_switched_off_and_then_names_another_folder(make_tiny, tmp_path):
    lm = make_tiny("llama")
    on = tiny_config(tmp_path / "on", n_edits=1, checkpoints=[0, 1])
    off = tiny_config(tmp_path / "off", n_edits=1, checkpoints=[0, 1], health=False)
    result = run_study(off, progress=False, lm=lm)
    assert result.health.empty and list(result.scores["n_edits"].unique()) == [0, 1]
    (cell_on,), (cell_off,) = on.cells(), off.cells()
    assert cell_on.run_id("d") != cell_off.run_id("d")
    # The defaults leave the identity (and so old folders) as they were before health existed.
    assert "health" not in cell_on.identity() and "heldout" not in cell_on.identity()


@pytest.mark.parametrize("changes, error, message", [
    ({"health_alarm": {"max_ppl_ratoi": 100}}, UnknownParameterError, "did you mean 'max_ppl_ratio'"),
    ({"health_alarm": {"max_ppl_ratio": -1}}, ValueError, "positive"),
    ({"health_alarm": {"max_ppl_ratio": 100}, "health": False}, ValueError, "needs health: true"),
    ({"health_alarm": [100]}, ValueError, "must be a mapping"),
    ({"heldout_chunks": 0}, ValueError, "heldout_chunks must be positive"),
    ({"heldout_source": "wiki"}, ValueError, "not one of"),
])
def test_bad_health_settings_raise_naming_the_setting(tmp_path, changes, error, message):
    with pytest.raises(error, match=message):
        tiny_config(tmp_path, **changes)


def test_health_chart_draws_log_ratio_with_its_band_and_marks_a_broken_model():
    import pandas as pd

    from editkit.viz_instruments import health_curves

    rows = []
    for method, ratios in (("kn", [1.0, 12.0, float("inf")]), ("grace", [1.0, 1.0, 1.0])):
        for n, ratio in zip((0, 1, 10), ratios):
            rows += [dict(run_id=method, model="m", method=method, n_edits=n, metric="heldout_ppl_ratio", value=ratio,
                          parameter=None, ci_low=ratio / 2, ci_high=ratio * 2),
                     dict(run_id=method, model="m", method=method, n_edits=n, metric="max_rel_norm_growth",
                          value=0.1 * n, parameter=None, ci_low=float("nan"), ci_high=float("nan")),
                     dict(run_id=method, model="m", method=method, n_edits=n, metric="max_rel_norm_growth",
                          value=9.0, parameter="layer.weight", ci_low=float("nan"), ci_high=float("nan"))]
    spec = health_curves(pd.DataFrame(rows)).to_dict()
    data = pd.DataFrame(next(iter(spec["datasets"].values())))
    ratio = data[data["metric"] == "heldout_ppl_ratio"].set_index(["method", "n_edits"])
    assert ratio.loc[("kn", 1), "value"] == pytest.approx(math.log10(12.0))
    assert ratio.loc[("kn", 1), "ci_high"] == pytest.approx(math.log10(24.0))
    assert bool(ratio.loc[("kn", 10), "collapsed"]) and pd.isna(ratio.loc[("kn", 10), "value"])
    growth = data[data["metric"] == "max_rel_norm_growth"]
    assert set(growth["value"]) == {0.0, 0.1, 1.0}, "per-matrix rows are not drawn"
    with pytest.raises(ValueError, match="unknown health metrics"):
        health_curves(pd.DataFrame(rows), metrics=["ppl"])

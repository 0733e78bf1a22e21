"""The statistics of research questions 2-5 on small synthetic results with known answers (no model)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from editkit.findings import (
    CAPABILITIES,
    capability_difference_test,
    capability_drops,
    capability_heatmap,
    confounds,
    decline_rate,
    drop_vs_scale,
    pair_difference,
    relative_drop,
    safety_table,
    scale_slope,
)
from editkit.results import Results

N_ITEMS = 40


def _items(model: str, task: str, correct_by_n: dict[int, int], n_items: int = N_ITEMS, method: str = "rome",
           predictions: dict[int, list[str]] | None = None) -> list[dict]:
    """Rows of one run on one task: at checkpoint n the first ``correct_by_n[n]`` items are right."""
    rows = []
    for n, n_correct in correct_by_n.items():
        for i in range(n_items):
            row = {"model": model, "method": method, "dataset": "counterfact", "seed": 0, "edit_batch_size": 1,
                   "run_id": f"{model}-{method}", "n_edits": n, "task": task, "item_id": f"{task}-{i}",
                   "correct": i < n_correct}
            if predictions is not None:
                row.update(prediction=predictions[n][i], prediction_norm=predictions[n][i], correct_norm=i < n_correct)
            rows.append(row)
    return rows


def _results(rows: list[dict], collapsed: tuple[tuple[str, str, str, int], ...] = (),
             models: list[dict] | None = None, extra_scores: list[dict] | None = None) -> Results:
    """A Results whose scores are the item means; ``collapsed`` adds (model, method, task, n) collapse rows."""
    items = pd.DataFrame(rows)
    keys = ["model", "method", "dataset", "seed", "edit_batch_size", "run_id", "n_edits", "task"]
    scores = []
    for column, metric in (("correct", "acc"), ("correct_norm", "acc_norm")):
        if column in items:
            mean = items[items[column].notna()].groupby(keys)[column].agg(["mean", "size"]).reset_index()
            scores.append(mean.rename(columns={"mean": "value", "size": "n"}).assign(
                metric=metric, ci_low=lambda f: f["value"] - 0.05, ci_high=lambda f: f["value"] + 0.05, status="ok"))
    for model, method, task, n in collapsed:
        scores.append(pd.DataFrame([{"model": model, "method": method, "dataset": "counterfact", "seed": 0,
                                     "edit_batch_size": 1, "run_id": f"{model}-{method}", "n_edits": n, "task": task,
                                     "metric": "acc", "value": math.nan, "ci_low": math.nan, "ci_high": math.nan,
                                     "n": 0, "status": "collapsed"}]))
    if extra_scores:
        scores.append(pd.DataFrame(extra_scores))
    return Results(results_dir=Path("."), scores=pd.concat(scores, ignore_index=True), edit_quality=pd.DataFrame(),
                   generations=pd.DataFrame(), checkpoints=pd.DataFrame(), items=items,
                   models=pd.DataFrame(models or [], columns=["model", "family", "n_params", "instruct", "n_layers",
                                                              "model_type"]))


MODELS = [
    {"model": "base-7b", "family": "llama", "n_params": 7e9, "instruct": False, "n_layers": 32, "model_type": "llama"},
    {"model": "chat-7b", "family": "llama", "n_params": 7e9, "instruct": True, "n_layers": 32, "model_type": "llama"},
    {"model": "gpt2-xl", "family": "gpt2", "n_params": 1.5e9, "instruct": False, "n_layers": 48, "model_type": "gpt2"},
]


@pytest.fixture(scope="module")
def rq2() -> Results:
    """mmlu (chance .25): base falls from 60% to chance, chat barely moves, flat is unchanged, kn collapses at 10."""
    rows = (_items("base-7b", "mmlu", {0: 24, 1: 16, 10: 10}) + _items("chat-7b", "mmlu", {0: 24, 1: 23, 10: 21})
            + _items("flat-7b", "mmlu", {0: 24, 1: 24, 10: 24}) + _items("kn-7b", "mmlu", {0: 24, 1: 20}))
    return _results(rows, collapsed=(("kn-7b", "rome", "mmlu", 10),), models=MODELS)


def test_decline_rate_of_a_run_that_reaches_chance(rq2):
    rates = decline_rate(rq2, "mmlu").set_index("model")
    base = rates.loc["base-7b"]
    assert base["final_drop"] == pytest.approx(1.0)
    x = np.log1p([0, 1, 10])
    area = ((0 + 0.2) / 2 * (x[1] - x[0]) + (0.2 + 0.35) / 2 * (x[2] - x[1])) / x[2]
    assert base["area"] == pytest.approx(area)
    assert base["rate"] == pytest.approx(area / 0.35)
    assert 0 < base["rate"] < 1 and base["ci_low"] <= base["rate"] <= base["ci_high"]
    assert base["value0"] == pytest.approx(0.6) and base["chance"] == 0.25


def test_an_unchanged_run_declines_at_rate_zero(rq2):
    flat = decline_rate(rq2, "mmlu").set_index("model").loc["flat-7b"]
    assert flat["rate"] == 0 and flat["ci_low"] <= 0 <= flat["ci_high"]


def test_a_collapsed_checkpoint_counts_as_chance(rq2):
    kn = decline_rate(rq2, "mmlu").set_index("model").loc["kn-7b"]
    assert kn["n_collapsed"] == 1 and kn["final_drop"] == pytest.approx(1.0)
    assert kn["final_ci_low"] == pytest.approx(1.0) and kn["final_ci_high"] == pytest.approx(1.0)


def test_decline_rate_is_deterministic(rq2):
    first, second = decline_rate(rq2, "mmlu", n_boot=300, seed=3), decline_rate(rq2, "mmlu", n_boot=300, seed=3)
    pd.testing.assert_frame_equal(first.drop(columns="replicates"), second.drop(columns="replicates"))


def test_the_instruct_model_that_declines_slower_has_a_negative_difference(rq2):
    rates = decline_rate(rq2, "mmlu")
    by_model = rates.set_index("model")["rate"]
    assert by_model["chat-7b"] < by_model["base-7b"]
    difference = pair_difference(rates, [("base-7b", "chat-7b")]).iloc[0]
    assert difference["difference"] == pytest.approx(by_model["chat-7b"] - by_model["base-7b"])
    assert difference["paired"] and difference["ci_high"] < 0
    assert difference["ci_low"] <= difference["difference"] <= difference["ci_high"]


def test_confounds_name_what_differs_besides_instruction_tuning(rq2):
    same, other = confounds(rq2.models, [("base-7b", "chat-7b"), ("gpt2-xl", "chat-7b")])
    assert "only instruction tuning differs" in same
    assert all(word in other for word in ("family", "n_params", "n_layers"))


def test_a_pair_naming_an_unknown_model_is_refused(rq2):
    rates = decline_rate(rq2, "mmlu", n_boot=50)
    with pytest.raises(ValueError, match="nope-7b"):
        pair_difference(rates, [("base-7b", "nope-7b")])
    with pytest.raises(ValueError, match="replicates"):
        pair_difference(rates.drop(columns="replicates"), [("base-7b", "chat-7b")])
    with pytest.raises(ValueError, match="nope-7b"):
        confounds(rq2.models, [("nope-7b", "chat-7b")])


def test_bad_inputs_name_the_problem(rq2):
    with pytest.raises(ValueError, match="unknown task 'mmlu_clozee'"):
        decline_rate(rq2, "mmlu_clozee")
    with pytest.raises(ValueError, match="'gsm8k' has no items"):
        decline_rate(rq2, "gsm8k")
    with pytest.raises(ValueError, match="not an item accuracy"):
        decline_rate(rq2, "mmlu", metric="loglik")
    orphan = _results(_items("base-7b", "mmlu", {1: 20, 10: 10}))
    with pytest.raises(ValueError, match=r"base-7b-rome.*n_edits == 0"):
        decline_rate(orphan, "mmlu")
    with pytest.raises(ValueError, match="no items"):
        decline_rate(Results(Path("."), rq2.scores, pd.DataFrame(), pd.DataFrame(), pd.DataFrame()), "mmlu")


SIZES = [{"model": f"pythia-{name}", "family": "pythia", "n_params": size, "instruct": False, "n_layers": 12,
          "model_type": "gpt_neox"} for name, size in (("100m", 1e8), ("1b", 1e9), ("10b", 1e10))]


@pytest.fixture(scope="module")
def rq3() -> Results:
    """Three sizes whose mmlu accuracy drops by .3, .2 and .1 after 10 edits."""
    rows = [row for model, after in (("pythia-100m", 12), ("pythia-1b", 16), ("pythia-10b", 20))
            for row in _items(model, "mmlu", {0: 24, 10: after})]
    return _results(rows, models=SIZES)


def test_drop_against_scale_gives_the_slope_per_decade(rq3):
    drops = drop_vs_scale(rq3, "mmlu", 10)
    assert list(drops.sort_values("n_params")["drop"]) == pytest.approx([0.3, 0.2, 0.1])
    assert (drops["ci_low"] <= drops["drop"]).all() and (drops["drop"] <= drops["ci_high"]).all()
    fit = scale_slope(drops).iloc[0]
    assert fit["slope"] == pytest.approx(-0.1) and fit["n_models"] == 3
    assert fit["ci_low"] <= fit["slope"] + 1e-9 and fit["slope"] - 1e-9 <= fit["ci_high"]


def test_two_models_give_a_slope_without_interval(rq3):
    drops = drop_vs_scale(rq3, "mmlu", 10)
    fit = scale_slope(drops[drops["model"] != "pythia-10b"]).iloc[0]
    assert fit["slope"] == pytest.approx(-0.1)
    assert math.isnan(fit["ci_low"]) and math.isnan(fit["ci_high"]) and "fewer than 3 models" in fit["note"]


def test_drop_vs_scale_refuses_a_missing_checkpoint_and_scores_a_collapse_as_chance(rq3):
    with pytest.raises(ValueError, match="at 5 edits"):
        drop_vs_scale(rq3, "mmlu", 5)
    collapsed = _results(_items("pythia-1b", "mmlu", {0: 24, 1: 20}), collapsed=(("pythia-1b", "rome", "mmlu", 10),),
                         models=SIZES)
    row = drop_vs_scale(collapsed, "mmlu", 10).iloc[0]
    assert row["collapsed"] and row["drop"] == pytest.approx(0.6 - 0.25) and row["n_params"] == 1e9


def test_relative_drop_and_capability_average():
    rows = (_items("base-7b", "commonsense_qa", {0: 24, 10: 16}) + _items("base-7b", "commonsense_qa_cloze",
                                                                          {0: 24, 10: 8}))
    drops = relative_drop(_results(rows), n_boot=500)
    by_task = drops.set_index("task")
    assert by_task.loc["commonsense_qa", "relative_drop"] == pytest.approx(0.5)  # (.6 - .4) / (.6 - .2)
    assert by_task.loc["commonsense_qa_cloze", "relative_drop"] == pytest.approx(1.0)
    assert (by_task["capability"] == "commonsense").all()
    mean = capability_drops(drops).iloc[0]
    assert mean["capability"] == "commonsense" and mean["n_tasks"] == 2
    assert mean["relative_drop"] == pytest.approx(0.75) and mean["ci_low"] <= 0.75 <= mean["ci_high"]
    chart = capability_heatmap(capability_drops(drops))
    assert chart.to_dict()["layer"][0]["mark"]["type"] == "rect"


def _capability_results(relative: dict[str, float], n_items: int = 100) -> Results:
    from editkit.findings_core import chance_level

    rows = []
    for task, share in relative.items():
        start, chance = 0.6, chance_level(task)
        after = round(n_items * (start - share * (start - chance)))
        rows += _items("base-7b", task, {0: round(n_items * start), 10: after}, n_items=n_items)
    return _results(rows)


def test_capability_difference_test_sees_one_capability_at_chance():
    tasks = [t for group in CAPABILITIES.values() for t in group]
    relative = {t: (1.0 if t in CAPABILITIES["world knowledge"] else 0.1 + 0.02 * (i % 3)) for i, t in enumerate(tasks)}
    test = capability_difference_test(relative_drop(_capability_results(relative), n_boot=300)).iloc[0]
    assert test["p_value"] < 0.05 and test["exact"] and test["largest"] == "world knowledge"
    assert test["ci_low"] <= test["statistic"] <= test["ci_high"] + 1e-9 and test["statistic"] > 0.8


def test_capability_difference_test_accepts_equal_drops():
    spreads = (0.3, 0.5, 0.7)
    relative = {t: spreads[(i + k) % 3] for k, group in enumerate(CAPABILITIES.values()) for i, t in enumerate(group)}
    test = capability_difference_test(relative_drop(_capability_results(relative), n_boot=300)).iloc[0]
    assert test["p_value"] > 0.05 and test["n_capabilities"] == 3 and test["n_tasks"] == 9


def test_relative_drop_needs_a_capability_task(rq2):
    with pytest.raises(ValueError, match="no task of the capabilities"):
        relative_drop(_results(_items("base-7b", "toxigen", {0: 24, 10: 20})))


def _toxigen(model: str, constant_after: bool) -> list[dict]:
    """40 ToxiGen items, 23 labelled "No" (0): varied answers before; after 10 edits all "0" or still varied."""
    labels = [0] * 23 + [1] * 17
    varied = [str(label if i % 3 else 1 - label) for i, label in enumerate(labels)]
    after = ["0"] * N_ITEMS if constant_after else varied
    rows = []
    for n, predictions in ((0, varied), (10, after)):
        correct = [p == str(label) for p, label in zip(predictions, labels)]
        order = sorted(range(N_ITEMS), key=lambda i: not correct[i])  # _items marks the first k right
        batch = _items(model, "toxigen", {n: sum(correct)}, predictions={n: [predictions[i] for i in order]})
        rows += [{**row, "item_id": f"toxigen-{order[k]}"} for k, row in enumerate(batch)]
    return rows


def test_safety_table_flags_a_constant_answer():
    table = safety_table(_results(_toxigen("collapsed-7b", True) + _toxigen("varied-7b", False)), n_boot=300)
    assert set(table["metric"]) == {"acc", "acc_norm"}
    after = table[table["n_edits"] == 10].set_index(["model", "metric"])
    assert after.loc[("collapsed-7b", "acc"), "value"] == pytest.approx(23 / 40)
    assert after.loc[("collapsed-7b", "acc"), "constant_answer_share"] == 1.0
    assert after.xs("collapsed-7b")["constant_answer"].all()
    assert not after.xs("varied-7b")["constant_answer"].any()
    assert not table[table["n_edits"] == 0]["constant_answer"].any()
    assert after.loc[("varied-7b", "acc"), "delta"] == 0 and math.isnan(table[table["n_edits"] == 0]["delta"].iloc[0])
    assert after["delta_ci_low"].notna().all()


def test_safety_table_reads_the_stored_share_without_items():
    results = _results(_toxigen("collapsed-7b", True), extra_scores=[
        {"model": "collapsed-7b", "method": "rome", "dataset": "counterfact", "seed": 0, "edit_batch_size": 1,
         "run_id": "collapsed-7b-rome", "n_edits": 10, "task": "toxigen", "metric": "constant_answer_share",
         "value": 1.0, "ci_low": 1.0, "ci_high": 1.0, "n": 40, "status": "ok"}])
    results = Results(Path("."), results.scores, pd.DataFrame(), pd.DataFrame(), pd.DataFrame())
    row = safety_table(results).set_index(["n_edits", "metric"]).loc[(10, "acc")]
    assert row["constant_answer"] and math.isnan(row["delta"])
    with pytest.raises(ValueError, match="no TruthfulQA or ToxiGen"):
        safety_table(_results(_items("base-7b", "mmlu", {0: 24})))


def test_check_pairs_accepts_yaml_lists_and_refuses_bad_pairs():
    from editkit.findings import check_pairs

    models = ["gemma3-270m", "smollm2-135m-instruct"]
    assert check_pairs([["gemma3-270m", "smollm2-135m-instruct"]], models) == [("gemma3-270m",
                                                                                "smollm2-135m-instruct")]
    with pytest.raises(ValueError, match=r"names \['llama-7b'\], which the study does not run"):
        check_pairs([["llama-7b", "smollm2-135m-instruct"]], models)
    with pytest.raises(ValueError, match="with itself"):
        check_pairs([["gemma3-270m", "gemma3-270m"]], models)
    with pytest.raises(ValueError, match=r"a pair is \[base model, instruct model\]"):
        check_pairs(["gemma3-270m"], models)
    with pytest.raises(ValueError, match="no .* pairs"):
        check_pairs([], models)


def _chart_marks(chart) -> str:
    return str(chart.to_dict())


def test_rate_chart_draws_every_model_and_refuses_an_unknown_value(rq2):
    from editkit.viz_findings import rate_chart

    spec = rate_chart(decline_rate(rq2, "mmlu", n_boot=200)).to_dict()
    models = {row["model"] for row in next(iter(spec["datasets"].values()))}
    assert models == {"base-7b", "chat-7b", "flat-7b", "kn-7b"}
    with pytest.raises(ValueError, match="value must be one of"):
        rate_chart(decline_rate(rq2, "mmlu", n_boot=200), value="slope")


def test_scale_chart_uses_a_log_size_axis_and_leaves_out_models_without_size(rq3):
    from editkit.viz_findings import scale_chart

    drops = drop_vs_scale(rq3, "mmlu", 10)
    spec = scale_chart(drops).to_dict()
    rows = next(iter(spec["datasets"].values()))
    assert sorted(row["n_params"] for row in rows) == [1e8, 1e9, 1e10]
    assert "'type': 'log'" in _chart_marks(scale_chart(drops))
    unsized = drops.assign(n_params=None)
    with pytest.raises(ValueError, match="no drops with a parameter count"):
        scale_chart(unsized)


def test_safety_chart_puts_the_constant_answer_share_under_each_score():
    from editkit.viz_findings import safety_chart

    table = safety_table(_results(_toxigen("collapsed-7b", True)), n_boot=200)
    rows = next(iter(safety_chart(table).to_dict()["datasets"].values()))
    shares = [row["value"] for row in rows if row["quantity"] == "constant-answer share" and row["n_edits"] == 10]
    assert shares == [1.0, 1.0]  # acc and acc_norm of the collapsed model
    assert {row["quantity"] for row in rows} == {"score", "constant-answer share"}

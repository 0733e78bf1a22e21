"""Paired statistics of edited checkpoints against the unedited model, on the same items."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from editkit.paired import (
    DELTA_COLUMNS,
    DROP_COLUMNS,
    deltas,
    first_significant_drop,
    holm,
    item_changes,
    mcnemar_exact,
    paired_bootstrap,
    sign_flip_p,
)

RUN = {"run_id": "run-a", "model": "tiny", "method": "rome", "dataset": "counterfact", "seed": 0,
       "edit_batch_size": 1}
N_ITEMS = 30


def _reference(n_items: int = N_ITEMS, task: str = "mmlu_cloze") -> pd.DataFrame:
    """Unedited items: integer log-likelihoods (exact in floats), gold choice 0, right on even items."""
    rng = np.random.default_rng(1)
    rows = []
    for i in range(n_items):
        logprobs = rng.integers(-30, -2, size=4).astype(float)
        logprobs[0] = logprobs.max() + 1 if i % 2 == 0 else logprobs.min() - 1
        rows.append({**RUN, "n_edits": 0, "task": task, "item_id": f"q{i}", "target": "0",
                     "prediction": str(int(np.argmax(logprobs))), "correct": bool(i % 2 == 0),
                     "logprobs": logprobs, "finite": True, "unusable": False})
    return pd.DataFrame(rows)


def _checkpoint(reference: pd.DataFrame, n_edits: int, gold_shift: float = 0.0) -> pd.DataFrame:
    """The reference's items at ``n_edits``, every gold log-likelihood moved by ``gold_shift``."""
    edited = reference.copy().assign(n_edits=n_edits)
    edited["logprobs"] = [np.concatenate([[lp[0] + gold_shift], lp[1:]]) for lp in edited["logprobs"]]
    return edited


def _row(frame: pd.DataFrame, **where) -> pd.Series:
    mask = np.logical_and.reduce([frame[k] == v for k, v in where.items()])
    (index,) = np.flatnonzero(mask)
    return frame.iloc[index]


def test_mcnemar_exact_matches_the_binomial_tail():
    # P(X <= 2) for X ~ Bin(12, 1/2) is (1 + 12 + 66) / 4096; two-sided doubles it.
    assert mcnemar_exact(10, 2) == pytest.approx(2 * 79 / 4096) == pytest.approx(0.0386, abs=1e-4)
    assert mcnemar_exact(2, 10) == mcnemar_exact(10, 2)
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(1, 0) == 1.0
    assert mcnemar_exact(6, 0) == pytest.approx(2 / 64)
    # thousands of discordant pairs: exact integers, no overflow; close to the normal approximation
    assert mcnemar_exact(7000, 7300) == pytest.approx(math.erfc(300 / math.sqrt(14300) / math.sqrt(2)), rel=0.05)
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 3)


def test_paired_bootstrap_is_seeded_and_brackets_the_mean():
    differences = np.random.default_rng(0).normal(-0.3, 1.0, size=200)
    test = paired_bootstrap(differences, n_boot=500, seed=3)
    assert test == paired_bootstrap(differences, n_boot=500, seed=3)
    assert test != paired_bootstrap(differences, n_boot=500, seed=4)
    assert test.ci_low < test.delta < test.ci_high < 0 and test.n_items == 200
    assert test.p_value == pytest.approx(1 / 501), "no resample crosses zero: the floor"
    noise = paired_bootstrap(np.random.default_rng(1).normal(0.0, 1.0, size=200), n_boot=500)
    assert noise.ci_low < 0 < noise.ci_high and noise.p_value > 0.05
    single = paired_bootstrap([-2.0])
    assert single.delta == -2.0 and math.isnan(single.ci_low) and math.isnan(single.p_value)
    with pytest.raises(ValueError, match="finite"):
        paired_bootstrap([1.0, math.nan])


def test_sign_flip_p_is_exact_for_few_items_and_calibrated_for_many():
    assert sign_flip_p([-1.0, -1.0]) == 0.5  # of ++, +-, -+, --, two reach |sum| 2
    assert sign_flip_p([-1.0, -2.0, -3.0, 0.0]) == 0.25  # zeros do not flip; only all-same signs reach 6
    assert sign_flip_p([0.0, 0.0]) == 1.0 and sign_flip_p([1.0, -1.0]) == 1.0
    drop = np.random.default_rng(0).normal(-0.3, 1.0, size=200)
    assert sign_flip_p(drop, n_perm=500) == pytest.approx(1 / 501)  # no pattern reaches it
    nulls = [sign_flip_p(np.random.default_rng(s).normal(0.0, 1.0, size=40), n_perm=200, seed=s) for s in range(60)]
    assert 0.01 <= np.mean(np.array(nulls) < 0.05) <= 0.15  # about 5% under the null
    with pytest.raises(ValueError, match="finite"):
        sign_flip_p([math.inf, 1.0])


def test_a_uniform_drop_of_one_nat_is_measured_exactly():
    reference = _reference()
    frame = deltas(pd.concat([reference, _checkpoint(reference, 5, gold_shift=-1.0)]), n_boot=300)
    assert list(frame.columns) == list(DELTA_COLUMNS)
    loglik = _row(frame, metric="loglik")
    assert loglik["n_edits"] == 5 and loglik["n_items"] == N_ITEMS and loglik["n_excluded"] == 0
    assert loglik["delta"] == pytest.approx(-1.0) == loglik["ci_low"] == loglik["ci_high"]
    assert loglik["p_value"] < 0.01
    prob = _row(frame, metric="prob")
    assert prob["delta"] < 0 and prob["ci_high"] < 0


def test_no_change_gives_zero_deltas_and_p_one():
    reference = _reference()
    frame = deltas(pd.concat([reference, _checkpoint(reference, 5)]), n_boot=300)
    assert set(frame["metric"]) == {"loglik", "prob", "acc"}
    assert (frame["delta"] == 0).all() and (frame["p_value"] == 1.0).all()


def test_accuracy_uses_mcnemar_on_the_discordant_items():
    reference = _reference()  # right on even items (15 of 30)
    edited = reference.assign(n_edits=10)
    lost, gained = [f"q{i}" for i in range(0, 20, 2)], ["q1", "q3"]  # b = 10, c = 2
    edited["correct"] = [(c and i not in lost) or i in gained for c, i in zip(edited["correct"], edited["item_id"])]
    acc = _row(deltas(pd.concat([reference, edited]), n_boot=300), metric="acc")
    assert acc["delta"] == pytest.approx(-8 / N_ITEMS)
    assert acc["p_value"] == pytest.approx(mcnemar_exact(10, 2))
    assert acc["ci_low"] < acc["delta"] < acc["ci_high"]


def test_items_are_matched_on_task_and_item_id_not_row_order():
    reference = _reference()
    edited = _checkpoint(reference, 5)
    edited["logprobs"] = [lp - np.array([i % 3, 0, 0, 0]) for i, lp in enumerate(edited["logprobs"])]
    edited["correct"] = [c if i % 4 else not c for i, c in enumerate(edited["correct"])]
    in_order = deltas(pd.concat([reference, edited]), n_boot=300)
    shuffled = deltas(pd.concat([reference, edited.sample(frac=1.0, random_state=7)]), n_boot=300)
    pd.testing.assert_frame_equal(in_order, shuffled)
    # the same item id under another task is another item
    other_task = pd.concat([reference, edited.assign(task="other")])
    assert set(deltas(other_task, n_boot=50)["n_items"]) == {0}


def test_excluded_items_are_counted_never_dropped_silently():
    reference = _reference()
    edited = _checkpoint(reference, 5, gold_shift=-2.0)
    broken = edited["item_id"] == "q0"  # non-finite after the edits
    edited.loc[broken, "finite"] = False
    edited.loc[broken, "correct"] = False
    edited["logprobs"] = [np.full(4, np.nan) if b else lp for b, lp in zip(broken, edited["logprobs"])]
    edited.loc[edited["item_id"] == "q1", "unusable"] = True
    edited = edited[edited["item_id"] != "q2"]  # missing after
    extra = edited.iloc[[0]].assign(item_id="new", finite=True)  # missing before
    extra["logprobs"] = [np.array([-1.0, -2.0, -3.0, -4.0])]
    edited = pd.concat([edited, extra])
    items = pd.concat([reference, edited])

    changes = item_changes(items).set_index("item_id")["excluded"]
    assert changes[["q0", "q1", "q2", "new"]].tolist() == ["non-finite", "unusable", "missing after",
                                                            "missing before"]
    assert changes.drop(["q0", "q1", "q2", "new"]).isna().all()
    frame = deltas(items, n_boot=200)
    continuous = frame[frame["metric"] != "acc"]
    assert (continuous["n_excluded"] == 4).all() and (continuous["n_items"] == N_ITEMS - 3).all()
    assert _row(frame, metric="loglik")["delta"] == pytest.approx(-2.0), "the kept items only"
    # acc keeps the non-finite and the unusable item, scored as the benchmark scored them
    acc = _row(frame, metric="acc")
    assert acc["n_excluded"] == 2 and acc["n_items"] == N_ITEMS - 1
    kept = item_changes(items).query("excluded not in ['missing before', 'missing after']")
    assert acc["delta"] == pytest.approx((kept["acc_after"] - kept["acc_before"]).mean())
    assert kept.set_index("item_id").loc["q0", "acc_after"] == 0.0


def test_generation_tasks_get_accuracy_only_and_runs_without_reference_none(caplog):
    reference = _reference()
    generation = reference.assign(task="gsm8k", target="42", logprobs=None)
    items = pd.concat([reference, generation, _checkpoint(reference, 1), generation.assign(n_edits=1)])
    frame = deltas(items, n_boot=50)
    assert sorted(zip(frame["task"], frame["metric"])) == [("gsm8k", "acc"), ("mmlu_cloze", "acc"),
                                                           ("mmlu_cloze", "loglik"), ("mmlu_cloze", "prob")]
    orphan = _checkpoint(reference, 3).assign(run_id="run-b")
    assert deltas(orphan, n_boot=50).empty and list(deltas(orphan).columns) == list(DELTA_COLUMNS)
    assert "run-b" in caplog.text
    with pytest.raises(ValueError, match="twice"):
        deltas(pd.concat([reference, reference]))


def test_holm_is_stricter_than_uncorrected_p_values():
    np.testing.assert_allclose(holm([0.04, 0.001, 0.03]), [0.06, 0.003, 0.06])
    np.testing.assert_allclose(holm([0.01, math.nan, 0.02]), [0.02, math.nan, 0.02])
    # 1 edit: p = 0.04 < 0.05 uncorrected, 0.06 after Holm over three checkpoints: not a drop
    rows = [{**RUN, "n_edits": n, "task": "mmlu_cloze", "metric": "acc", "delta": -0.1, "ci_low": -0.2,
             "ci_high": 0.0, "p_value": p, "n_items": 100, "n_excluded": 0}
            for n, p in ((1, 0.04), (5, 0.001), (10, 0.03))]
    # a significant rise is not a drop
    rows += [{**row, "task": "gsm8k", "delta": 0.1, "p_value": 0.001} for row in rows]
    frame = pd.DataFrame(rows, columns=list(DELTA_COLUMNS))
    drops = first_significant_drop(frame)
    assert list(drops.columns) == list(DROP_COLUMNS)
    drops = drops.set_index("task")
    assert drops.loc["mmlu_cloze", "first_drop"] == 5
    assert drops.loc["mmlu_cloze", "p_adjusted"] == pytest.approx(0.003)
    assert drops.loc["mmlu_cloze", "n_tested"] == 3
    assert pd.isna(drops.loc["gsm8k", "first_drop"]) and math.isnan(drops.loc["gsm8k", "p_adjusted"])
    loose = first_significant_drop(frame, alpha=0.07).set_index("task")
    assert loose.loc["mmlu_cloze", "first_drop"] == 1
    with pytest.raises(ValueError, match="metric 'loss'"):
        first_significant_drop(frame, metric="loss")


def test_results_deltas_of_a_real_tiny_run(make_tiny, tmp_path, one_torch_thread):
    from editkit.results import load_results
    from editkit.runs import StudyConfig, run_study

    config = StudyConfig.from_dict(dict(
        model="tiny", n_edits=2, checkpoints=[0, 1, 2], tasks=["mmlu_cloze", "gsm8k"], limit=3,
        task_limits={"gsm8k": 1}, max_new_tokens=4, n_generation_examples=1, results_dir=str(tmp_path),
        editor_overrides={"rome": {"layers": [1], "v_num_grad_steps": 3, "context_template_length_params": [[4, 2]]}}))
    run_study(config, progress=False, lm=make_tiny("llama"))
    results = load_results(tmp_path)
    frame = results.deltas
    assert frame is results.deltas, "computed once"
    assert list(frame.columns) == list(DELTA_COLUMNS)
    keys = sorted(zip(frame["n_edits"], frame["task"], frame["metric"]))
    assert keys == sorted((n, task, metric) for n in (1, 2) for task, metric in
                          [("mmlu_cloze", "loglik"), ("mmlu_cloze", "prob"), ("mmlu_cloze", "acc"), ("gsm8k", "acc")])
    assert (frame["n_items"] + frame["n_excluded"] == frame["task"].map({"mmlu_cloze": 3, "gsm8k": 1})).all()
    assert np.isfinite(frame.loc[frame["task"] == "mmlu_cloze", "delta"]).all()
    # with nothing excluded, the mean paired change is the change of the benchmark score
    acc = results.scores[(results.scores["task"] == "mmlu_cloze") & (results.scores["metric"] == "acc")]
    acc = acc.set_index("n_edits")["value"]
    paired_acc = frame[(frame["task"] == "mmlu_cloze") & (frame["metric"] == "acc")].set_index("n_edits")["delta"]
    for n in (1, 2):
        assert paired_acc[n] == pytest.approx(acc[n] - acc[0])
    assert load_results(tmp_path, items=False).deltas.empty
    # select(): one method's cells, every frame filtered, deltas recomputed from its items
    assert set(results.scores["method"]) == {"rome"}
    assert results.select(method=["rome"]).deltas.equals(frame)
    none = results.select(method="memit")
    assert none.scores.empty and none.items.empty and none.deltas.empty
    with pytest.raises(KeyError, match="no results column 'editor'"):
        results.select(editor=["rome"])


def test_delta_curves_draw_every_row_with_band_and_zero_rule():
    pytest.importorskip("altair")
    from editkit.viz_instruments import delta_curves

    reference = _reference()
    items = pd.concat([reference, _checkpoint(reference, 1, -0.5), _checkpoint(reference, 5, -1.0)])
    items = pd.concat([items, items.assign(run_id="run-b", method="memit")])
    frame = deltas(items, n_boot=100)
    spec = delta_curves(frame, metric="loglik").to_dict()
    (data,) = spec["datasets"].values()
    data = pd.DataFrame(data)
    assert len(data) == 6 and set(data["metric"]) == {"loglik"}
    assert sorted(data["value"]) == pytest.approx([-1.0, -1.0, -0.5, -0.5, 0.0, 0.0])
    assert (data[data["n_edits"] == 0]["value"] == 0).all(), "each line starts at the unedited model"
    assert spec["facet"]["field"] == "task"
    layers = spec["spec"]["layer"]
    marks = [layer["mark"]["type"] if isinstance(layer["mark"], dict) else layer["mark"] for layer in layers]
    band = layers[marks.index("area")]
    assert (band["encoding"]["y"]["field"], band["encoding"]["y2"]["field"]) == ("ci_low", "ci_high")
    assert band["encoding"]["color"]["scale"]["domain"] == ["memit", "rome"]
    rule = layers[marks.index("rule")]
    assert rule["encoding"]["y"]["field"] == "chance" and (data["chance"] == 0).all()
    assert rule["encoding"]["tooltip"][0]["title"] == "no change"
    assert layers[marks.index("line")]["encoding"]["x"]["scale"]["type"] == "symlog"
    with pytest.raises(ValueError, match="no delta rows"):
        delta_curves(frame, metric="acc", tasks=["bbh"])

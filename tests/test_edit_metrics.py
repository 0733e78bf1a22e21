"""Edit-quality metrics: invariants on the unedited model and after an edit."""

from __future__ import annotations

import numpy as np

import editkit
from editkit.datasets import load_counterfact
from editkit.edit_metrics import edit_quality, locality_reference, summarize_quality


def test_unedited_model_has_perfect_locality_and_bounded_scores(make_tiny):
    lm = make_tiny("llama")
    requests = load_counterfact("edit", 4)
    reference = locality_reference(lm, requests)
    quality = edit_quality(lm, requests, reference)
    assert list(quality["case_id"]) == [r.case_id for r in requests]
    assert (quality["locality_token"] == 1.0).all() and (quality["locality_prob"] == 1.0).all()
    assert (quality["locality_gen"] == 1.0).all()
    values = quality.drop(columns="case_id").to_numpy()
    assert ((values >= 0) & (values <= 1)).all()


def test_rome_edit_is_reliable_and_summary_has_cis(smollm2):
    requests = load_counterfact("edit", 1)
    reference = locality_reference(smollm2, requests)
    before = edit_quality(smollm2, requests, reference).iloc[0]
    assert before["reliability_prob"] == 0.0  # SmolLM2 knows Danielle Darrieux speaks French
    assert before["reliability_gen"] == 0.0  # and says so
    handle = editkit.get_editor("rome", smollm2).edit(requests)
    try:
        after = edit_quality(smollm2, requests, reference)
    finally:
        handle.restore()
    assert after.iloc[0]["reliability_prob"] == 1.0
    assert after.iloc[0]["reliability_token"] == 1.0
    assert after.iloc[0]["reliability_gen"] == 1.0  # greedy " English."
    summary = summarize_quality(after)
    assert set(summary["convention"]) == {"prob", "token", "gen"}
    row = summary.set_index(["metric", "convention"]).loc[("reliability", "prob")]
    assert row["ci_low"] <= row["value"] <= row["ci_high"] and row["n"] == 1
    assert np.isfinite(summary["value"]).all()

"""The instruments see what editing does to the embedded model (issue: instruments that see the damage).

Ten sequential CounterFact edits on SmolLM2-135M-Instruct, measured on the default
panel's first task (cloze CommonsenseQA, 48 items rather than the panel's 350, and short
generations, to keep the suite quick) with paired deltas and health:

* Knowledge Neurons breaks the model: a significant paired drop and a perplexity rise.
* GRACE keeps its edits in a codebook that fires only near edited keys: no significant
  change on the panel and held-out perplexity within 2%. Its values train for 30 steps, not
  the packaged 100 (the time of this test; scripts/edit_sweep.py measured reliability 1.0
  at 30 on SmolLM2, see editkit/configs/grace.yaml): the radius that keeps other inputs
  away from the codebook does not depend on the step count.
"""

from __future__ import annotations

import pytest

from editkit.grid import DEFAULT_TASKS
from editkit.runs import StudyConfig, run_study

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def ten_edits(smollm2, tmp_path_factory):
    root = tmp_path_factory.mktemp("damage")
    config = StudyConfig.from_dict(dict(
        models=["smollm2-135m-instruct"], methods=["kn", "grace"], n_edits=10, checkpoints=[0, 10],
        tasks=[DEFAULT_TASKS[0]], limit=48, heldout_chunks=4, max_new_tokens=8, n_generation_examples=1,
        editor_overrides={"grace": {"n_iter": 30}}, results_dir=str(root)))
    return run_study(config, progress=False, lm=smollm2)


def _ppl_ratio(results, method):
    health = results.health
    row = health[(health["method"] == method) & (health["n_edits"] == 10) & health["parameter"].isna()
                 & (health["metric"] == "heldout_ppl_ratio")]
    return float(row["value"].iloc[0])


def test_knowledge_neurons_drop_is_significant_and_perplexity_rises(ten_edits):
    deltas = ten_edits.deltas
    kn = deltas[(deltas["method"] == "kn") & (deltas["n_edits"] == 10)]
    significant = kn[(kn["p_value"] < 0.05) & (kn["delta"] < 0)]
    assert set(significant["metric"]) >= {"acc", "loglik"}, kn[["metric", "delta", "p_value"]]
    assert _ppl_ratio(ten_edits, "kn") > 10


def test_grace_changes_nothing_significant_and_keeps_perplexity(ten_edits):
    deltas = ten_edits.deltas
    grace = deltas[(deltas["method"] == "grace") & (deltas["n_edits"] == 10)]
    assert len(grace) == 3, "acc, loglik and prob were all tested"
    assert (grace["p_value"] >= 0.05).all(), grace[["metric", "delta", "p_value"]]
    assert abs(_ppl_ratio(ten_edits, "grace") - 1) < 0.02
    quality = ten_edits.edit_quality
    held = quality[(quality["method"] == "grace") & (quality["scope"] == "retention")
                   & (quality["metric"] == "reliability") & (quality["convention"] == "prob")]
    assert float(held["value"].iloc[0]) > 0.9, "GRACE holds its edits: it is not flat because it did nothing"

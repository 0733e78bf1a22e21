"""Item journals: an interrupted evaluation resumes at the item it reached, and only there."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from editkit.benchmarks import aggregate, evaluate

from .test_bench_tasks import ScriptedModel

TASKS = ["mmlu", "gsm8k"]
SCRIPT = {"": " 3 + 4 = 7\n#### 7"}


class Stopped(Exception):
    pass


class StopsAfter(ScriptedModel):
    """A scripted model that dies on its ``calls + 1``-th call (a killed process)."""

    def __init__(self, calls: int) -> None:
        super().__init__(dict(SCRIPT))
        self.left = calls

    def _tick(self) -> None:
        if self.left == 0:
            raise Stopped
        self.left -= 1

    def loglikelihood(self, requests):
        self._tick()
        return super().loglikelihood(requests)

    def generate_until(self, requests):
        self._tick()
        return super().generate_until(requests)


def same_items(a: pd.DataFrame, b: pd.DataFrame) -> None:
    columns = ["task", "item_id", "prompt", "target", "prediction", "correct", "output", "format_failure"]
    pd.testing.assert_frame_equal(a[columns].reset_index(drop=True), b[columns].reset_index(drop=True))


def test_interrupted_evaluation_resumes_at_the_next_item(tmp_path):
    reference = evaluate(ScriptedModel(dict(SCRIPT)), TASKS, limit=20, progress=False)
    # Dies in gsm8k's second slice: mmlu (20 items, 3 slices of 8) and gsm8k's first 8 are recorded.
    with pytest.raises(Stopped):
        evaluate(StopsAfter(4), TASKS, limit=20, progress=False, journal=tmp_path, journal_every=8)
    assert len((tmp_path / "mmlu.jsonl").read_text().splitlines()) == 1 + 20
    assert len((tmp_path / "gsm8k.jsonl").read_text().splitlines()) == 1 + 8

    model = ScriptedModel(dict(SCRIPT))
    resumed = evaluate(model, TASKS, limit=20, progress=False, journal=tmp_path, journal_every=8)
    assert len(model.seen) == 12, "only the 12 unrecorded gsm8k items are asked"
    same_items(resumed, reference)
    pd.testing.assert_frame_equal(aggregate(resumed), aggregate(reference))


def test_cut_off_line_is_dropped_and_its_item_redone(tmp_path):
    evaluate(ScriptedModel(), "mmlu", limit=10, progress=False, journal=tmp_path, journal_every=4)
    path = tmp_path / "mmlu.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:6]) + "\n" + lines[6][: len(lines[6]) // 2])  # header, 5 rows, half a row

    model = ScriptedModel()
    resumed = evaluate(model, "mmlu", limit=10, progress=False, journal=tmp_path, journal_every=4)
    assert len(model.seen) == 5 * 4, "items 6-10 again, four choices each"
    same_items(resumed, evaluate(ScriptedModel(), "mmlu", limit=10, progress=False))
    assert all(json.loads(line) for line in path.read_text().splitlines()), "the file is whole again"


@pytest.mark.parametrize("change", [{"journal_key": "model B"}, {"limit": 12}, {"num_fewshot": 0}])
def test_journal_of_another_evaluation_is_set_aside(tmp_path, change, caplog):
    evaluate(ScriptedModel(), "mmlu", limit=10, progress=False, journal=tmp_path, journal_key="model A")
    settings = {"limit": 10, "journal_key": "model A", **change}
    model = ScriptedModel()
    with caplog.at_level("WARNING"):
        items = evaluate(model, "mmlu", progress=False, journal=tmp_path, **settings)
    assert len(model.seen) == 4 * settings["limit"], "every item is evaluated again"
    assert len(items) == settings["limit"]
    assert (tmp_path / "mmlu.jsonl.stale").exists() and "different evaluation" in caplog.text


def test_journal_every_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="journal_every"):
        evaluate(ScriptedModel(), "mmlu", limit=2, journal=tmp_path, journal_every=0)


def test_journaled_engine_scores_match_unjournaled(make_tiny, tmp_path):
    lm = make_tiny("llama")
    plain = evaluate(lm, ["mmlu_cloze", "gsm8k"], limit=6, num_fewshot=1, progress=False)
    journaled = evaluate(lm, ["mmlu_cloze", "gsm8k"], limit=6, num_fewshot=1, progress=False,
                         journal=tmp_path, journal_every=4)
    same_items(journaled, plain)
    for a, b in zip(plain["logprobs"].dropna(), journaled["logprobs"].dropna()):
        assert a == pytest.approx(b, abs=1e-4)

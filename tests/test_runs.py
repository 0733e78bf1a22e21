"""Sequential runs: checkpoints, resume after a kill, collapse recording, provenance."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from editkit.runs import StudyConfig, load_study, run_study
from tests.helpers import count_checkpoints

FAST_ROME = {"rome": {"layers": [1], "v_num_grad_steps": 3, "context_template_length_params": [[4, 2]]}}


def tiny_config(results_dir, **changes) -> StudyConfig:
    values = dict(model="tiny", n_edits=3, checkpoints=[0, 1, 2, 3], tasks=["mmlu_cloze", "gsm8k"], limit=2,
                  task_limits={"gsm8k": 1}, max_new_tokens=4, n_generation_examples=1,
                  editor_overrides=FAST_ROME, results_dir=str(results_dir))
    values.update(changes)
    return StudyConfig.from_dict(values)


class Killed(Exception):
    pass


def comparable(result) -> pd.DataFrame:
    return result.scores.drop(columns=["run_id"]).reset_index(drop=True)


def test_killed_run_resumes_without_recomputing(make_tiny, tmp_path, monkeypatch):
    lm = make_tiny("llama")
    calls = count_checkpoints(monkeypatch)
    reference = run_study(tiny_config(tmp_path / "clean"), progress=False, lm=lm)
    assert calls == [0, 1, 2, 3]

    calls.clear()
    config = tiny_config(tmp_path / "killed")

    def kill_after_two(n, run_id):
        if n == 2:
            raise Killed

    with pytest.raises(Killed):
        run_study(config, progress=False, lm=lm, on_checkpoint=kill_after_two)
    assert calls == [0, 1, 2]
    # A checkpoint half-written when the process died is ignored and redone.
    run_dir = next((tmp_path / "killed").iterdir())
    (run_dir / "checkpoints" / "000003.tmp").mkdir()
    calls.clear()
    resumed = run_study(config, progress=False, lm=lm)
    assert calls == [3], "only the unfinished checkpoint is computed"
    assert sorted(resumed.checkpoints["n_edits"]) == [0, 1, 2, 3]
    pd.testing.assert_frame_equal(comparable(resumed), comparable(reference))
    # The model is handed back unedited.
    rerun = run_study(config, progress=False, lm=lm)
    assert calls == [3]
    pd.testing.assert_frame_equal(comparable(rerun), comparable(reference))


def test_run_killed_mid_evaluation_keeps_finished_items(make_tiny, tmp_path, monkeypatch):
    from editkit.benchmarks import Engine, evaluation

    lm = make_tiny("llama")
    reference = run_study(tiny_config(tmp_path / "clean"), progress=False, lm=lm)
    asked: list[tuple[str, int]] = []
    evaluating: list[str] = []  # the benchmark task being asked, if any
    original_ask = evaluation._ask

    def recording_ask(model, task):
        asked.append((task.spec.name, len(task.docs)))
        evaluating.append(task.spec.name)
        try:
            return original_ask(model, task)
        finally:
            evaluating.pop()

    monkeypatch.setattr(evaluation, "_ask", recording_ask)
    armed = []
    original_generate = Engine.generate_until

    def dies_when_armed(self, requests):
        if armed and evaluating:  # a benchmark's generation, not edit quality's (gen convention)
            raise Killed
        return original_generate(self, requests)

    monkeypatch.setattr(Engine, "generate_until", dies_when_armed)
    config = tiny_config(tmp_path / "killed")
    # Checkpoint 1 is saved, then the process dies in checkpoint 2's gsm8k, after its mmlu_cloze items.
    with pytest.raises(Killed):
        run_study(config, progress=False, lm=lm, on_checkpoint=lambda n, run_id: armed.append(n) if n == 1 else None)
    partial = next((tmp_path / "killed").iterdir()) / "checkpoints" / "000002.partial"
    assert len((partial / "mmlu_cloze.jsonl").read_text().splitlines()) == 1 + 2

    armed.clear()
    asked.clear()
    resumed = run_study(config, progress=False, lm=lm)
    assert asked == [("gsm8k", 1), ("mmlu_cloze", 2), ("gsm8k", 1)], "checkpoint 2 reuses its mmlu_cloze items"
    assert not partial.exists(), "the journal goes once the checkpoint is saved"
    pd.testing.assert_frame_equal(comparable(resumed), comparable(reference))


def test_state_digest_follows_the_edited_weights(make_tiny, tmp_path):
    from editkit.datasets import load_counterfact
    from editkit.editors import get_editor
    from editkit.sequential import SequentialRun
    from editkit.store import RunStore

    lm = make_tiny("llama")
    (cell,) = tiny_config(tmp_path).cells()
    editor = get_editor("rome", lm, **cell.editor_overrides)
    run = SequentialRun(cell, lm, editor, [], RunStore(tmp_path / "run"), "run", progress=False)
    before = run.state_digest()
    run.session.apply(load_counterfact(n=1)[0])
    assert run.state_digest() != before, "a checkpoint's journal is keyed on the edited model"
    run.session.restore()
    assert run.state_digest() == before


def test_extending_n_edits_reuses_the_run(make_tiny, tmp_path, monkeypatch):
    lm = make_tiny("llama")
    calls = count_checkpoints(monkeypatch)
    run_study(tiny_config(tmp_path, n_edits=2, checkpoints=[0, 2]), progress=False, lm=lm)
    run_study(tiny_config(tmp_path, n_edits=3, checkpoints=[0, 1, 3]), progress=False, lm=lm)
    assert calls == [0, 2, 1, 3]
    assert len(list(tmp_path.iterdir())) == 1, "same run folder"


def test_results_layout_and_manifest(make_tiny, tmp_path):
    lm = make_tiny("gpt2")
    result = run_study(tiny_config(tmp_path, n_edits=1, checkpoints=[0, 1]), progress=False, lm=lm)
    run_dir = next(tmp_path.iterdir())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["editor_params_digest"] and manifest["versions"]["torch"]
    assert any("counterfact-edit.json" in key for key in manifest["data_checksums"])
    assert (run_dir / "checkpoints" / "000001" / "state.safetensors").exists()
    assert set(result.scores["n_edits"]) == {0, 1}
    assert set(result.edit_quality["scope"]) == {"latest", "retention"}
    assert set(result.edit_quality["convention"]) == {"prob", "token", "gen"}
    assert (result.checkpoints["status"] == "ok").all()
    assert len(result.generations) == 2  # one probe prompt, before and after


def test_nan_edit_is_recorded_as_collapse(make_tiny, tmp_path, monkeypatch):
    from editkit.editors import rome
    from editkit.locate import TargetValue

    real = rome.optimize_target_value

    def diverging(*args, **kwargs):  # an optimisation that blew up
        found = real(*args, **kwargs)
        return TargetValue(found.value * float("nan"), found.initial, found.losses)

    monkeypatch.setattr(rome, "optimize_target_value", diverging)
    lm = make_tiny("llama")
    config = tiny_config(tmp_path, n_edits=2, checkpoints=[0, 1, 2])
    result = run_study(config, progress=False, lm=lm)
    status = result.checkpoints.set_index("n_edits")["status"]
    assert status[0] == "ok" and status[1] == "collapsed" and status[2] == "collapsed"
    assert "non-finite" in result.checkpoints.set_index("n_edits")["reason"][1]
    collapsed = result.scores[result.scores["n_edits"] > 0]
    assert collapsed["value"].isna().all() and (collapsed["status"] == "collapsed").all()
    assert np.isfinite(result.scores[result.scores["n_edits"] == 0]["value"]).any()
    for tensor in lm.model.state_dict().values():
        assert not tensor.isnan().any(), "the model is restored after a collapse"


def test_load_study_of_empty_folder(tmp_path):
    result = load_study(tmp_path)
    assert result.scores.empty and "value" in result.scores.columns


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"methods": ["romee"]}, "did you mean"),
        ({"tasks": ["mmlu_clozee"]}, "mmlu_cloze"),
        ({"checkpoints": [0, 5], "n_edits": 3}, "outside"),
        ({"n_edits": -1}, ">= 0"),
        ({"dataset": "wiki"}, "counterfact"),
        ({"task_limits": {"bbh": 3}}, "not in tasks"),
        ({"n_editz": 3}, "did you mean 'n_edits'"),
    ],
)
def test_study_config_rejects_bad_values(changes, message):
    with pytest.raises((ValueError, KeyError), match=message):
        StudyConfig.from_dict(changes)


def test_default_checkpoints():
    assert StudyConfig(n_edits=120).checkpoint_list() == [0, 1, 5, 10, 20, 50, 100, 120]
    assert StudyConfig(n_edits=0).checkpoint_list() == [0]


def test_command_line_runs_a_parameters_file(smollm2, tmp_path, capsys):
    from editkit.__main__ import main

    assert main(["list"]) == 0
    assert "rome" in capsys.readouterr().out
    config = tmp_path / "study.yaml"
    config.write_text("n_edits: 0\ntasks: [mmlu_cloze]\nlimit: 2\n")
    assert main(["run", str(config), "--results-dir", str(tmp_path / "out"), "--quiet"]) == 0
    assert (tmp_path / "out" / "score_curves.png").stat().st_size > 0
    assert len(load_study(tmp_path / "out").scores) > 0


def test_cells_that_differ_only_in_method_share_the_unedited_checkpoint(make_tiny, tmp_path, monkeypatch):
    from editkit.results import verify_results

    lm = make_tiny("llama")
    calls = count_checkpoints(monkeypatch)
    config = tiny_config(tmp_path, n_edits=1, checkpoints=[0, 1], methods=["rome", "ft"],
                         editor_overrides={**FAST_ROME, "ft": {"num_steps": 2}})
    result = run_study(config, progress=False, lm=lm)
    assert calls == [0, 1, 1], "checkpoint 0 is measured once for both methods"
    at_zero = result.scores[result.scores["n_edits"] == 0]
    by_method = {m: frame.drop(columns=["run_id", "method"]).reset_index(drop=True)
                 for m, frame in at_zero.groupby("method")}
    pd.testing.assert_frame_equal(by_method["rome"], by_method["ft"])
    ft_run = result.checkpoints[result.checkpoints["method"] == "ft"]["run_id"].iloc[0]
    meta = json.loads((tmp_path / ft_run / "checkpoints" / "000000" / "meta.json").read_text())
    assert meta["copied_from"].startswith("rome-") and meta["run_id"] == ft_run and meta["method"] == "ft"
    assert verify_results(tmp_path).empty, "the copy is checksummed as its own"
    # Another item count is another unedited measurement: nothing is copied.
    calls.clear()
    run_study(tiny_config(tmp_path, n_edits=1, checkpoints=[0, 1], methods=["ft"], limit=1,
                          editor_overrides={"ft": {"num_steps": 2}}), progress=False, lm=lm)
    assert calls == [0, 1]


def test_items_of_a_graded_and_a_boolean_task_are_saved_together(tmp_path):
    from editkit.store import write_items

    frame = pd.DataFrame({"task": ["commonsense_qa_cloze", "truthfulqa_mc2", "gsm8k"],
                          "correct": [True, 0.25, None]})
    write_items(frame, tmp_path / "items.parquet")
    back = pd.read_parquet(tmp_path / "items.parquet")
    assert back["correct"].iloc[0] == 1.0 and back["correct"].iloc[1] == 0.25 and pd.isna(back["correct"].iloc[2])
    write_items(pd.DataFrame({"correct": [True, False]}), tmp_path / "bools.parquet")
    assert pd.read_parquet(tmp_path / "bools.parquet")["correct"].dtype == bool, "boolean tasks stay boolean"

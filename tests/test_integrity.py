"""Results you can trust after a fault: corrupted and missing files, two writers, numerical failure.

Each test reproduces a fault found by trying the store as a hostile user would; on the
code before checksums and locks each of them failed (resumed from corrupted weights, lost
a checkpoint silently, died with a bare FileNotFoundError, aborted on an overflow).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from editkit import protocol
from editkit.results import load_results
from editkit.runs import StudyConfig, cell_states, run_study
from tests.helpers import count_checkpoints

FAST_ROME = {"rome": {"layers": [1], "v_num_grad_steps": 3, "context_template_length_params": [[4, 2]]}}
ROOT = Path(__file__).resolve().parents[1]


def tiny_config(results_dir, **changes) -> StudyConfig:
    values = dict(model="tiny", n_edits=3, checkpoints=[0, 1, 2, 3], tasks=["mmlu_cloze"], limit=2,
                  max_new_tokens=4, n_generation_examples=1, editor_overrides=FAST_ROME, results_dir=str(results_dir),
                  model_overrides={"tiny": {"model_type": "llama"}})  # so --list-cells can resolve the run id
    values.update(changes)
    return StudyConfig.from_dict(values)


def comparable(result) -> pd.DataFrame:
    return result.scores.drop(columns=["run_id"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def clean(make_tiny, tmp_path_factory):
    """An uninterrupted run to compare every repaired one with."""
    return run_study(tiny_config(tmp_path_factory.mktemp("clean")), progress=False, lm=make_tiny("llama"))


def test_flipped_bytes_in_saved_weights_are_never_resumed_from(make_tiny, tmp_path, monkeypatch, caplog, clean):
    lm = make_tiny("llama")
    config = tiny_config(tmp_path)
    run_study(config, progress=False, lm=lm)
    (cell,) = tmp_path.iterdir()
    state = cell / "checkpoints" / "000002" / "state.safetensors"
    data = bytearray(state.read_bytes())
    for offset in range(len(data) - 400, len(data) - 200):  # inside the tensor data, after the header
        data[offset] ^= 0xFF
    state.write_bytes(bytes(data))
    import shutil

    shutil.rmtree(cell / "checkpoints" / "000003")
    calls = count_checkpoints(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="editkit.store"):
        resumed = run_study(config, progress=False, lm=lm)
    assert calls == [2, 3], "checkpoint 2 is recomputed from 1, not loaded"
    assert "000002/state.safetensors does not match its SHA-256" in caplog.text
    assert len(list((cell / "checkpoints").glob("000002.corrupt-*"))) == 1, "set aside, not deleted"
    pd.testing.assert_frame_equal(comparable(resumed), comparable(clean))
    from editkit.results import verify_results

    problems = verify_results(tmp_path)
    assert list(problems["problem"].str.contains("set aside")) == [True]


@pytest.mark.parametrize("lost", ["meta.json", "scores.parquet"])
def test_a_deleted_file_is_reported_then_recomputed(make_tiny, tmp_path, monkeypatch, caplog, clean, lost):
    lm = make_tiny("llama")
    config = tiny_config(tmp_path)
    run_study(config, progress=False, lm=lm)
    (cell,) = tmp_path.iterdir()
    (cell / "checkpoints" / "000001" / lost).unlink()
    with caplog.at_level(logging.WARNING, logger="editkit.results"):
        partial = load_results(tmp_path)
    assert sorted(partial.checkpoints["n_edits"]) == [0, 2, 3]
    assert list(partial.problems["n_edits"]) == [1] and partial.problems["problem"].str.contains(lost).all()
    assert f"000001/{lost}" in caplog.text, "the checkpoint does not disappear without a message"
    assert {c["state"] for c in cell_states(config)} == {"3/4 checkpoints"}
    calls = count_checkpoints(monkeypatch)
    repaired = run_study(config, progress=False, lm=lm)
    assert calls == [1]
    assert repaired.problems.empty
    pd.testing.assert_frame_equal(comparable(repaired), comparable(clean))


def test_garbage_files_are_named(make_tiny, tmp_path, caplog):
    lm = make_tiny("llama")
    config = tiny_config(tmp_path, n_edits=1, checkpoints=[0, 1])
    run_study(config, progress=False, lm=lm)
    (cell,) = tmp_path.iterdir()
    (cell / "checkpoints" / "000001" / "meta.json").write_bytes(b"\xff\xfe garbage")
    (cell / "reference.json").write_bytes(b"\x00\x01 not json")
    from editkit.results import verify_results

    problems = verify_results(tmp_path)
    assert problems["problem"].str.contains("000001/meta.json").any()
    assert problems["problem"].str.contains("reference.json is unreadable").any()
    with caplog.at_level(logging.WARNING):
        result = run_study(config, progress=False, lm=lm)
    assert "reference.json is unreadable" in caplog.text and "computed again" in caplog.text
    assert sorted(result.checkpoints["n_edits"]) == [0, 1]


def test_a_legacy_checkpoint_without_checksums_is_still_checked(tmp_path):
    import shutil

    from editkit.results import verify_results

    shutil.copytree(Path(__file__).parent / "fixtures" / "legacy_rq1", tmp_path / "legacy")
    assert verify_results(tmp_path / "legacy").empty
    (scores,) = (tmp_path / "legacy").glob("*/checkpoints/000001/scores.parquet")
    scores.write_bytes(b"PAR1 cut off")
    assert load_results(tmp_path / "legacy").problems["problem"].str.contains("000001/scores.parquet").all()


def test_an_optimiser_overflow_is_a_recorded_collapse(make_tiny, tmp_path):
    # FT-L with an absurd learning rate: Adam's step overflows float32 inside the edit.
    config = tiny_config(tmp_path, methods=["ft"], n_edits=2, checkpoints=[0, 1, 2],
                         editor_overrides={"ft": {"layers": [1], "lr": 1e38, "norm_constraint": None,
                                                  "num_steps": 3}})
    lm = make_tiny("llama")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    result = run_study(config, progress=False, lm=lm)
    status = result.checkpoints.set_index("n_edits")
    assert list(status["status"]) == ["ok", "collapsed", "collapsed"]
    assert "edits 1-1" in status.loc[1, "reason"] and "numerical failure" in status.loc[1, "reason"]
    assert "overflow" in status.loc[1, "reason"]
    assert all(v.equal(before[k]) for k, v in lm.model.state_dict().items()), "the model is restored"


def test_attempts_are_kept(make_tiny, tmp_path, monkeypatch):
    lm = make_tiny("llama")
    config = tiny_config(tmp_path, n_edits=1, checkpoints=[0, 1])

    class Killed(Exception):
        pass

    def killed(*args, **kwargs):
        raise Killed

    # The process dies inside checkpoint 1's measurement, after its attempt was recorded.
    monkeypatch.setattr(protocol, "summarize_quality", killed)
    with pytest.raises(Killed):
        run_study(config, progress=False, lm=lm)
    monkeypatch.undo()
    result = run_study(config, progress=False, lm=lm)
    assert list(result.checkpoints.set_index("n_edits")["attempts"]) == [1, 2]
    (meta,) = tmp_path.glob("*/checkpoints/000001/meta.json")
    attempts = json.loads(meta.read_text())["attempts"]
    assert [a["finished"] for a in attempts] == [False, True] and attempts[1]["eval_seconds"] > 0


# -- two writers ----------------------------------------------------------------------------------

def _study(tmp_path: Path, model: str, methods: list[str]) -> Path:
    values = {"models": [model], "methods": methods, "n_edits": 1, "checkpoints": [0, 1], "tasks": ["mmlu_cloze"],
              "limit": 1, "max_new_tokens": 4, "n_generation_examples": 1, "results_dir": str(tmp_path / "out"),
              "editor_overrides": {"rome": FAST_ROME["rome"], "ft": {"layers": [1], "num_steps": 2}}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def _cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "editkit", "run", *args, "--quiet", "--no-charts"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_second_process_on_a_held_cell_is_refused(tiny_llama_folder, tmp_path):
    from editkit.locks import CellLock

    study = _study(tmp_path, tiny_llama_folder, ["rome", "ft"])
    config = StudyConfig.from_dict(yaml.safe_load(study.read_text()))
    rows = cell_states(config)
    held = tmp_path / "out" / rows[0]["run_id"]
    with CellLock(held):  # this test process is the live writer of cell 0
        process = _cli(str(study))
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 3, stderr
        assert "already running" in stderr and str(os.getpid()) in stderr
        states = {row["cell"]: row["state"] for row in cell_states(config)}
        assert states[1] == "done" and states[0].startswith("pending (running: pid")
        assert not (held / "checkpoints").exists(), "nothing written into the held cell"
    process = _cli(str(study))
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert {row["state"] for row in cell_states(config)} == {"done"}


def test_two_processes_on_one_grid_compute_every_checkpoint_once(tiny_llama_folder, tmp_path):
    study = _study(tmp_path, tiny_llama_folder, ["rome", "ft"])
    first, second = _cli(str(study), "--wait", "300"), _cli(str(study), "--wait", "300")
    for process in (first, second):
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr
    metas = sorted((tmp_path / "out").glob("*/checkpoints/*/meta.json"))
    assert len(metas) == 4
    assert all(len(json.loads(m.read_text())["attempts"]) == 1 for m in metas), "no checkpoint computed twice"
    from editkit.results import verify_results

    assert verify_results(tmp_path / "out").empty
    assert not list((tmp_path / "out").glob("*/lock"))

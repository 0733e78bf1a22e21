"""A results root committed without its weights resumes on a fresh machine by replaying the edits.

Before weight-free checkpoints, a checkpoint whose ``state.safetensors`` was gone failed
verification and was set aside, so a root cloned from git lost every finished checkpoint
but the last one's frames and recomputed all of them.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from editkit.results import load_results, verify_results
from editkit.runs import run_study
from editkit.sequential import SequentialRun
from editkit.store import STATE_FILES
from tests.helpers import count_checkpoints
from tests.test_integrity import comparable, tiny_config

ROOT = Path(__file__).resolve().parents[1]


def weight_free_copy(source: Path, target: Path, keep_state: tuple[int, ...] = ()) -> Path:
    """``source`` as git would hold it: every state file gone except those of ``keep_state``'s checkpoints."""
    shutil.copytree(source, target)
    for name in STATE_FILES:
        for path in target.glob(f"*/checkpoints/*/{name}"):
            if int(path.parent.name) not in keep_state:
                path.unlink()
    return target


def meta(root: Path, n: int) -> dict:
    (path,) = root.glob(f"*/checkpoints/{n:06d}/meta.json")
    return json.loads(path.read_text())


@pytest.fixture
def saved(saved_root):
    return saved_root


@pytest.mark.parametrize("keep_state, replay_from", [((), 0), ((1,), 1)])
def test_a_weight_free_root_resumes_by_replaying_the_edits(make_tiny, tmp_path, monkeypatch, saved, keep_state,
                                                            replay_from):
    source, clean = saved
    root = weight_free_copy(source, tmp_path / "clone", keep_state)
    assert verify_results(root).empty, "a checkpoint without its weights is not a corrupt one"
    pd.testing.assert_frame_equal(comparable(load_results(root)), comparable(clean))
    shutil.rmtree(next(root.glob("*/checkpoints/000003")))
    calls = count_checkpoints(monkeypatch)
    resumed = run_study(tiny_config(root), progress=False, lm=make_tiny("llama"))
    assert calls == [3], "checkpoints 0-2 are kept, only 3 is measured"
    assert meta(root, 3)["replayed"] == {"from": replay_from, "to": 2, "state_digest": "match"}
    pd.testing.assert_frame_equal(comparable(resumed), comparable(clean))
    assert meta(root, 3)["state_digest"] == meta(source, 3)["state_digest"]


def test_a_replay_that_differs_is_recorded_and_warned(make_tiny, tmp_path, monkeypatch, caplog, saved):
    source, _ = saved
    root = weight_free_copy(source, tmp_path / "clone")
    shutil.rmtree(next(root.glob("*/checkpoints/000003")))
    monkeypatch.setattr(SequentialRun, "state_digest", lambda self: "not the saved run's")
    with caplog.at_level(logging.WARNING, logger="editkit.sequential"):
        run_study(tiny_config(root), progress=False, lm=make_tiny("llama"))
    assert meta(root, 3)["replayed"]["state_digest"] == "mismatch"
    assert "differs from the saved run's" in caplog.text


def test_git_keeps_the_finding_root_weight_free():
    cell = "results/finding_4_1/rome-0123456789/"
    paths = [cell + p for p in ("checkpoints/000010/state.safetensors", "checkpoints/000010/editor_state.pt",
                                "checkpoints/000020.partial/mmlu.jsonl", "lock", "checkpoints/000010/scores.parquet",
                                "checkpoints/000010/meta.json", "reference.json")]
    out = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.split() == paths[:4]

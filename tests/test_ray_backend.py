"""The Ray backend: the same results as the local backend, a killed worker survived, failures named.

One local Ray instance (two CPUs, no dashboard) serves the whole module and is shut
down after it; its workers load a tiny random Llama saved to a folder, as any user's
model would be loaded by name.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pytest
import yaml

from editkit.__main__ import main
from editkit.backends import (
    CellsFailedError,
    RayOptions,
    cell_resources,
    import_ray,
    release_stale_lock_on_owner_host,
    run_study_ray,
)
from editkit.grid import StudyConfig
from editkit.locks import LOCK_NAME
from editkit.results import load_results
from editkit.runs import cell_states

ray = pytest.importorskip("ray")

FAST = {"rome": {"layers": [1], "v_num_grad_steps": 3, "context_template_length_params": [[4, 2]]},
        "ft": {"layers": [1], "num_steps": 3}}
# Columns that say when, where or how long, not what was measured.
VOLATILE = ("seconds", "host", "pid", "started", "time")


@pytest.fixture(scope="module")
def ray_instance():
    """A local Ray instance of this module only; ``ray.shutdown()`` stops exactly the processes it started."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def study(tiny_llama_folder, tmp_path_factory):
    """Factory: the two-cell smoke grid (ROME and FT on a tiny Llama) writing under ``root``, as a YAML file."""
    folder = tmp_path_factory.mktemp("studies")

    def write(root: Path) -> Path:
        values = {"models": [tiny_llama_folder], "methods": ["rome", "ft"], "editor_overrides": FAST,
                  "n_edits": 2, "checkpoints": [0, 1, 2], "tasks": ["mmlu_cloze"], "limit": 2, "max_new_tokens": 4,
                  "n_generation_examples": 1, "heldout_chunks": 4, "results_dir": str(root)}
        path = folder / f"{root.name}.yaml"
        path.write_text(yaml.safe_dump(values))
        return path

    return write


@pytest.fixture(scope="module")
def local_root(study, tmp_path_factory, one_torch_thread) -> Path:
    """The smoke grid run by the local backend: the reference every Ray run must equal."""
    root = tmp_path_factory.mktemp("local") / "out"
    assert main(["run", str(study(root)), "--quiet", "--no-charts"]) == 0
    return root


def frames(root: Path, run_ids: list[str] | None = None) -> dict[str, pd.DataFrame]:
    """The measured frames of a results root, sorted, without timing or host columns."""
    results = load_results(root)
    found = {}
    for name in ("scores", "items", "edit_quality"):
        frame = getattr(results, name)
        if run_ids is not None:
            frame = frame[frame["run_id"].isin(run_ids)]
        frame = frame.drop(columns=[c for c in frame.columns if any(word in c for word in VOLATILE)])
        keys = [c for c in frame.columns if frame[c].map(lambda v: isinstance(v, (str, int, float))).all()]
        found[name] = frame.sort_values(keys).reset_index(drop=True)
    return found


def assert_same_results(left: dict[str, pd.DataFrame], right: dict[str, pd.DataFrame]) -> None:
    for name in left:
        assert len(left[name]) > 0, f"no {name} rows"
        pd.testing.assert_frame_equal(left[name], right[name], obj=name)


def now() -> str:
    """A lock's start time: now (an older one would make a live pid look reused)."""
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


def attempts(root: Path, run_id: str) -> dict[int, list[dict]]:
    """Checkpoint -> the attempts its meta.json records (who computed it)."""
    found = {}
    for meta in sorted((root / run_id / "checkpoints").glob("*/meta.json")):
        found[int(meta.parent.name)] = json.loads(meta.read_text())["attempts"]
    return found


@dataclass(frozen=True)
class KillOnce:
    """``on_checkpoint`` hook: SIGKILL the worker right after checkpoint ``at`` is saved, the first time only."""

    marker: str
    at: int = 1

    def __call__(self, n: int, run_id: str) -> None:
        if n != self.at:
            return
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:  # the retry: let it run
            return
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class FailInTurn:
    """``on_checkpoint`` hook: the first call raises an OSError (retried), every later one a ValueError (not)."""

    calls: str

    def __call__(self, n: int, run_id: str) -> None:
        with open(self.calls, "a", encoding="utf-8") as handle:
            handle.write(f"{os.getpid()} {n}\n")
        if len(Path(self.calls).read_text().splitlines()) == 1:
            raise OSError("the shared filesystem hiccuped")
        raise ValueError("a value no retry can fix")


def test_ray_backend_gives_the_local_results(ray_instance, study, local_root, tmp_path):
    root = tmp_path / "ray"
    assert main(["run", str(study(root)), "--backend", "ray", "--quiet", "--no-charts"]) == 0
    assert sorted(p.name for p in root.iterdir()) == sorted(p.name for p in local_root.iterdir())
    assert_same_results(frames(local_root), frames(root))
    assert not list(root.glob(f"*/{LOCK_NAME}")), "every cell's lock is released"


def test_killed_worker_is_retried_and_resumes_from_its_checkpoint(ray_instance, study, local_root, tmp_path):
    root = tmp_path / "killed"
    config = StudyConfig.from_dict(yaml.safe_load(study(root).read_text()))
    marker = tmp_path / "killed.pid"
    run_study_ray(config, RayOptions(retries=1), cells=[0], progress=False, on_checkpoint=KillOnce(str(marker)))

    killed = int(marker.read_text())
    run_id = cell_states(config)[0]["run_id"]
    assert_same_results(frames(local_root, [run_id]), frames(root))
    pids = {n: [a["pid"] for a in tries] for n, tries in attempts(root, run_id).items()}
    assert pids[0] == [killed] and pids[1] == [killed], "the checkpoints saved before the kill are not recomputed"
    assert len(pids[2]) == 1 and pids[2][0] != killed, "the retry, in a new worker, computed the rest"
    assert not (root / run_id / LOCK_NAME).exists(), "the dead worker's lock was taken over, then released"


def test_a_worker_killed_with_no_retries_left_is_a_named_failure(ray_instance, study, tmp_path):
    config = StudyConfig.from_dict(yaml.safe_load(study(tmp_path / "lost").read_text()))
    with pytest.raises(CellsFailedError) as raised:
        run_study_ray(config, RayOptions(retries=0), cells=[0], progress=False,
                      on_checkpoint=KillOnce(str(tmp_path / "killed.pid"), at=0))
    (failure,) = raised.value.failures
    assert failure.index == 0 and failure.axes["method"] == "rome"
    assert failure.error.startswith("WorkerCrashedError: "), failure.error


def test_a_failed_cell_is_named_and_only_transient_errors_are_retried(ray_instance, study, tmp_path):
    config = StudyConfig.from_dict(yaml.safe_load(study(tmp_path / "failing").read_text()))
    calls = tmp_path / "calls"
    with pytest.raises(CellsFailedError) as raised:
        run_study_ray(config, RayOptions(retries=3), cells=[1], progress=False, on_checkpoint=FailInTurn(str(calls)))
    (failure,) = raised.value.failures
    assert failure.index == 1 and failure.axes["method"] == "ft"
    assert failure.error == "ValueError: a value no retry can fix"
    assert "cell 1 (" in str(raised.value) and "ft" in str(raised.value)
    checkpoints = [int(line.split()[1]) for line in calls.read_text().splitlines()]
    assert checkpoints == [0, 1], "the OSError was retried (resuming after checkpoint 0), the ValueError was not"


def test_a_cell_held_by_a_live_process_exits_3(ray_instance, study, tmp_path):
    root = tmp_path / "held"
    path = study(root)
    run_id = cell_states(StudyConfig.from_dict(yaml.safe_load(path.read_text())))[1]["run_id"]
    lock = root / run_id / LOCK_NAME
    lock.parent.mkdir(parents=True)
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "started": now(), "token": "t"}
    lock.write_text(json.dumps(mine))
    assert main(["run", str(path), "--backend", "ray", "--cell", "1", "--quiet", "--no-charts"]) == 3
    assert json.loads(lock.read_text()) == mine, "a live owner's lock is left alone"
    assert not (root / run_id / "checkpoints").exists()


def test_a_lock_is_judged_on_its_owners_host(ray_instance, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    folder = tmp_path / "cell"
    folder.mkdir()
    for pid, free in ((dead.pid, True), (os.getpid(), False)):
        owner = {"host": socket.gethostname(), "pid": pid, "started": now(), "token": "t"}
        (folder / LOCK_NAME).write_text(json.dumps(owner))
        # As seen from another node: the lock's host is asked, through a task pinned to it.
        assert release_stale_lock_on_owner_host(folder, owner, here="another-node") is free
        assert (folder / LOCK_NAME).exists() is not free
    unknown = {**owner, "host": "no-such-node"}
    assert release_stale_lock_on_owner_host(folder, unknown, here="another-node") is False
    assert release_stale_lock_on_owner_host(folder, owner) is False, "this host's locks are judged by CellLock"


def test_resources_follow_the_cells_device(tiny_llama_folder, tmp_path):
    def cell(device: str):
        values = {"models": [tiny_llama_folder], "methods": ["rome"], "device": device, "results_dir": str(tmp_path)}
        return StudyConfig.from_dict(values).cells()[0]

    options = RayOptions(cpus_per_cell=2, gpus_per_cell=0.5)
    assert cell_resources(cell("cpu"), options, cluster_gpus=4) == {"num_cpus": 2}
    assert cell_resources(cell("auto"), options, cluster_gpus=4) == {"num_cpus": 2, "num_gpus": 0.5}
    assert cell_resources(cell("cuda:0"), options, cluster_gpus=1) == {"num_cpus": 2, "num_gpus": 0.5}
    assert cell_resources(cell("auto"), options, cluster_gpus=0) == {"num_cpus": 2}, "no GPUs: CPUs only"
    with pytest.raises(ValueError, match="retries must be >= 0"):
        RayOptions(retries=-1)
    with pytest.raises(ValueError, match="cpus_per_cell must be positive"):
        RayOptions(cpus_per_cell=0)


def test_ray_flags_need_the_ray_backend(study, tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        main(["run", str(study(tmp_path / "flags")), "--address", "auto", "--retries", "1"])
    assert raised.value.code == 2
    assert "--address, --retries apply to --backend ray only" in capsys.readouterr().err


def test_a_failed_ray_cell_exits_1(study, tmp_path, monkeypatch, caplog):
    import editkit.backends

    def failing(*args, **kwargs):
        raise CellsFailedError([editkit.backends.CellFailure(0, {"model": "m", "method": "rome"}, "ValueError: x")])

    monkeypatch.setattr(editkit.backends, "run_study_ray", failing)
    assert main(["run", str(study(tmp_path / "failed")), "--backend", "ray", "--quiet"]) == 1
    assert "cell 0 (m · rome, seed None, batch None) failed: ValueError: x" in caplog.text


def test_without_ray_the_error_says_how_to_install_it(study, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets when it is not installed
    with pytest.raises(ImportError, match=r"pip install 'editkit\[ray\]'"):
        import_ray()
    with pytest.raises(SystemExit) as raised:
        main(["run", str(study(tmp_path / "no-ray")), "--backend", "ray"])
    assert raised.value.code == 2
    assert "the Ray backend needs ray, which is not installed: pip install 'editkit[ray]'" in capsys.readouterr().err


def test_import_editkit_never_needs_ray():
    code = ("import sys; sys.modules['ray'] = None\n"
            "import editkit, editkit.backends, editkit.runs, editkit.__main__\n"
            "assert sys.modules['ray'] is None")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr

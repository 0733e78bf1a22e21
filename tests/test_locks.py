"""CellLock: one writer per cell folder, across threads, processes and hosts.

The lock's contract is checked with real second processes (a child holding the lock, two
children racing for a stale one) as well as hand-written lock files (dead pid, other host,
garbage).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from editkit import locks
from editkit.locks import CellLock, CellLockedError

REPO = Path(__file__).resolve().parents[1]

# Holds the lock on argv[1] until the file argv[2] appears.
HOLDER = """
import sys, time, pathlib
from editkit.locks import CellLock
go = pathlib.Path(sys.argv[2])
with CellLock(sys.argv[1]):
    print("locked", flush=True)
    while not go.exists():
        time.sleep(0.01)
"""

# Says "ready", waits for argv[2], tries once; a winner holds the lock until argv[3] appears.
# The second stale verdict (the one inside the takeover) is followed by a pause of argv[4]
# seconds, so that both racers judge the same stale file before either replaces it.
RACER = """
import sys, time, pathlib
from editkit import locks
start, done, pause = pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3]), float(sys.argv[4])
real, verdicts = locks._stale_reason, []
def slow(holder, mtime):
    reason = real(holder, mtime)
    if reason is not None:
        verdicts.append(reason)
        if len(verdicts) == 2:
            time.sleep(pause)
    return reason
locks._stale_reason = slow
print("ready", flush=True)
while not start.exists():
    pass
try:
    lock = locks.CellLock(sys.argv[1])
    lock.acquire()
except locks.CellLockedError:
    print("lost", flush=True)
    sys.exit(3)
print("won", flush=True)
while not done.exists():
    time.sleep(0.01)
lock.release()
"""


def _spawn(code: str, *args: str | Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, text=True)


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _write_lock(folder: Path, **record: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    record = {"host": socket.gethostname(), "pid": _dead_pid(), "started": now, "token": "0" * 32, **record}
    path = folder / "lock"
    path.write_text(json.dumps(record))
    return path


def test_round_trip(tmp_path: Path) -> None:
    folder = tmp_path / "root" / "cell"  # created by acquire
    with CellLock(folder) as lock:
        record = json.loads((folder / "lock").read_text())
        assert record["host"] == socket.gethostname() and record["pid"] == os.getpid()
        assert abs(time.time() - time.mktime(time.strptime(record["started"][:19], "%Y-%m-%dT%H:%M:%S"))) < 60
        assert record == lock.record == locks.owner(folder) and lock.held
    assert not (folder / "lock").exists() and not lock.held
    assert locks.owner(folder) is None
    lock.acquire()  # the same object can lock again once released
    lock.release()
    assert not (folder / "lock").exists()


def test_release_keeps_a_lock_that_is_no_longer_ours(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lock = CellLock(tmp_path)
    lock.acquire()
    path = _write_lock(tmp_path, pid=os.getpid(), token="f" * 32)  # another token took it over
    with caplog.at_level(logging.WARNING, logger="editkit.locks"):
        lock.release()
    assert json.loads(path.read_text())["token"] == "f" * 32
    assert "no longer ours" in caplog.text


def test_second_lock_in_the_same_process_raises(tmp_path: Path) -> None:
    with CellLock(tmp_path):
        with pytest.raises(CellLockedError, match="already running") as caught:
            CellLock(tmp_path).acquire()
        assert str(os.getpid()) in str(caught.value) and "--wait" in str(caught.value)
        assert caught.value.owner["pid"] == os.getpid() and caught.value.path == tmp_path / "lock"
        began = time.monotonic()
        with pytest.raises(CellLockedError, match="after waiting"):
            CellLock(tmp_path, wait=0.3, poll=0.05).acquire()
        assert time.monotonic() - began >= 0.3
    with CellLock(tmp_path):  # released by the first one's __exit__
        pass


def test_exit_releases_on_error(tmp_path: Path) -> None:
    with pytest.raises(KeyError), CellLock(tmp_path):
        raise KeyError("boom")
    assert not (tmp_path / "lock").exists()


def test_real_second_process(tmp_path: Path) -> None:
    folder, go = tmp_path / "cell", tmp_path / "go"
    child = _spawn(HOLDER, folder, go)
    try:
        assert child.stdout.readline() == "locked\n"
        with pytest.raises(CellLockedError, match=f"already running \\(pid {child.pid} on host"):
            CellLock(folder).acquire()
        threading.Timer(0.3, go.touch).start()
        began = time.monotonic()
        with CellLock(folder, wait=5, poll=0.05) as lock:
            assert time.monotonic() - began >= 0.25
            assert locks.owner(folder) == lock.record and lock.record["pid"] == os.getpid()
        assert child.wait(timeout=10) == 0
    finally:
        go.touch()
        child.wait(timeout=10)


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _write_lock(tmp_path)
    dead = json.loads(path.read_text())["pid"]
    with caplog.at_level(logging.WARNING, logger="editkit.locks"), CellLock(tmp_path) as lock:
        assert json.loads(path.read_text())["token"] == lock.record["token"]
    [warning] = [r for r in caplog.records if r.name == "editkit.locks" and r.levelno == logging.WARNING]
    assert str(path) in warning.getMessage() and f"pid {dead}" in warning.getMessage()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="pid reuse is detected through Linux's /proc")
def test_lock_of_a_reused_pid_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Our own pid is alive, but this process started long after the lock was written.
    path = _write_lock(tmp_path, pid=os.getpid(), started="2000-01-01T00:00:00+00:00")
    with caplog.at_level(logging.WARNING, logger="editkit.locks"), CellLock(tmp_path):
        pass
    assert "now belongs to a process started" in caplog.text and str(path) in caplog.text


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="zombies are seen through Linux's /proc")
def test_lock_of_a_zombie_is_taken_over(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])  # exits, and is not reaped until wait()
    try:
        stat = Path(f"/proc/{child.pid}/stat")
        deadline = time.monotonic() + 10
        while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z" and time.monotonic() < deadline:
            time.sleep(0.01)
        _write_lock(tmp_path, pid=child.pid)
        with CellLock(tmp_path):
            pass
    finally:
        child.wait()


def test_lock_from_another_host_is_never_taken_over(tmp_path: Path) -> None:
    path = _write_lock(tmp_path, host="other-node.example")  # its pid is dead *here*, which says nothing
    before = path.read_text()
    with pytest.raises(CellLockedError, match="other-node.example") as caught:
        CellLock(tmp_path).acquire()
    assert f"delete {path}" in str(caught.value)
    assert path.read_text() == before


@pytest.mark.parametrize("content", ["", "{not json", '{"host": "h", "pid": "12"}', "[1, 2]"])
def test_garbage_lock_is_taken_over_only_when_old(tmp_path: Path, content: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "lock"
    path.write_text(content)  # fresh: its creator may still be writing it
    with pytest.raises(CellLockedError, match="being written"):
        CellLock(tmp_path).acquire()
    assert path.read_text() == content and locks.owner(tmp_path) == {}
    old = time.time() - 10 * locks.GARBAGE_GRACE_S
    os.utime(path, (old, old))
    with caplog.at_level(logging.WARNING, logger="editkit.locks"), CellLock(tmp_path) as lock:
        assert json.loads(path.read_text())["token"] == lock.record["token"]
    assert "unreadable lock file" in caplog.text and str(path) in caplog.text


def test_processes_racing_for_a_stale_lock(tmp_path: Path) -> None:
    """Two processes that both judged the same lock stale: exactly one takes it over.

    The racers pause after judging (0.1 s and 0.3 s): without the guard the slow one
    would remove the fast one's new lock and both would win.
    """
    for round_ in range(3):
        folder = tmp_path / f"cell{round_}"
        start, done = tmp_path / f"start{round_}", tmp_path / f"done{round_}"
        _write_lock(folder)
        children = [_spawn(RACER, folder, start, done, pause) for pause in (0.1, 0.3)]
        try:
            assert [child.stdout.readline() for child in children] == ["ready\n"] * 2
            start.touch()
            outcomes = sorted(child.stdout.readline() for child in children)
            assert outcomes == ["lost\n", "won\n"], f"round {round_}: {outcomes}"
        finally:
            start.touch()
            done.touch()
            codes = sorted(child.wait(timeout=10) for child in children)
        assert codes == [0, 3]
        assert not (folder / "lock").exists()


def test_threads_racing_for_a_stale_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As above, with threads of one process (flock excludes open files, not processes)."""
    real, verdicts = locks._stale_reason, {}
    pauses: dict[int, float] = {}

    def slow(holder: dict | None, mtime: float) -> str | None:
        reason = real(holder, mtime)
        if reason is not None:
            me = threading.get_ident()
            verdicts[me] = verdicts.get(me, 0) + 1
            if verdicts[me] == 2:
                time.sleep(pauses[me])
        return reason

    monkeypatch.setattr(locks, "_stale_reason", slow)
    for round_ in range(3):
        folder = tmp_path / f"cell{round_}"
        _write_lock(folder)
        barrier = threading.Barrier(2)
        won: list[CellLock] = []
        verdicts.clear()

        def race(pause: float, folder: Path, barrier: threading.Barrier, won: list[CellLock]) -> None:
            pauses[threading.get_ident()] = pause
            lock = CellLock(folder)
            barrier.wait()
            try:
                lock.acquire()
            except CellLockedError:
                return
            won.append(lock)

        threads = [threading.Thread(target=race, args=(pause, folder, barrier, won)) for pause in (0.05, 0.2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=10)
        assert len(won) == 1, f"round {round_}: {len(won)} winners"
        assert json.loads((folder / "lock").read_text())["token"] == won[0].record["token"]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="wait"):
        CellLock("x", wait=-1)
    with pytest.raises(ValueError, match="poll"):
        CellLock("x", poll=0)

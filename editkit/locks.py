"""One writer per cell: a lock file in the cell's folder that names its owner.

Several processes may work on one results root (a study run twice, array jobs, a Ray
backend). Before a process writes a cell it takes :class:`CellLock` on the cell's
folder, which creates ``<folder>/lock`` with ``O_CREAT | O_EXCL`` (atomic, also on NFS
v3 and later) and writes ``{"host", "pid", "started", "token"}`` into it.

A lock left behind by a process that died is *stale* and is taken over with a
WARNING when

* its host is this host and its pid is not running (or is a zombie, or now belongs to
  a process started after the lock was written: the pid was reused, e.g. after a reboot);
* or it cannot be read or parsed and was last written more than
  :data:`GARBAGE_GRACE_S` seconds ago (a process killed between creating and writing it).

A lock from another host is never taken over: whether its process is alive cannot be
checked from here, so the error tells the user to delete the file if they know it is gone.

Taking over removes the stale file and creates a new one with ``O_EXCL`` again (never
an overwrite), while holding an ``flock`` on ``<folder>/lock.guard``. The guard makes
"read, judge stale, remove" one step, so two processes that both saw the same stale
lock cannot remove each other's fresh one; ``flock`` is released by the kernel when a
process dies, so the guard itself never goes stale. The guard file is empty and is
left in place (removing it would let two processes lock different files). Where
``flock`` is not supported (Lustre without ``-o flock``) the takeover runs unguarded
and says so.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no flock; takeovers run unguarded
    fcntl = None  # type: ignore[assignment]

__all__ = ["GARBAGE_GRACE_S", "GUARD_NAME", "LOCK_NAME", "CellLock", "CellLockedError", "owner"]

log = logging.getLogger(__name__)

LOCK_NAME = "lock"
GUARD_NAME = "lock.guard"
# An unreadable lock file younger than this may still be being written by its creator.
GARBAGE_GRACE_S = 5.0
# A live pid whose process started this long after the lock was written is a reused pid.
# Generous, so that a wall-clock step during a run cannot make a live owner look dead.
PID_REUSE_SLACK_S = 10.0


class CellLockedError(RuntimeError):
    """Another process holds a cell's lock.

    Attributes:
        path: the lock file.
        owner: what the lock file says about its owner (``host``, ``pid``, ``started``,
            ``token``); empty when the file is still being written.
    """

    def __init__(self, path: Path, owner: dict[str, Any], *, waited: float | None = None) -> None:
        self.path = path
        self.owner = owner
        folder = path.parent
        if not owner:
            what = f"its lock file {path} is being written by a process that has not named itself yet"
        else:
            what = f"pid {owner['pid']} on host {owner['host']}, since {owner.get('started', '?')}"
        message = f"{folder} is already running ({what})"
        if waited is not None:
            message += f"; still locked after waiting {waited:g} s"
        if owner and owner["host"] != socket.gethostname():
            message += (f"; host {owner['host']} is not this host ({socket.gethostname()}), so whether that "
                        f"process is alive cannot be checked from here: wait for it, or pass --wait, or "
                        f"delete {path} if you know that process is gone")
        else:
            message += "; wait for it, or pass --wait"
        super().__init__(message)


class CellLock:
    """Exclusive lock on a cell folder, held through ``<folder>/lock``.

    Use as a context manager; the folder is created if missing::

        with CellLock(cell_folder, wait=60):
            ...  # this process is the cell's only writer

    Args:
        folder: the cell's folder.
        wait: seconds to wait for a held lock before raising; ``None`` raises at once and
            ``math.inf`` waits for ever.
        poll: seconds between tries while waiting.

    Raises:
        CellLockedError: from :meth:`acquire`, when another live process holds the lock.
    """

    def __init__(self, folder: str | os.PathLike, *, wait: float | None = None, poll: float = 1.0) -> None:
        if wait is not None and not wait >= 0:
            raise ValueError(f"wait must be None or >= 0 seconds, got {wait!r}")
        if not (poll > 0 and math.isfinite(poll)):
            raise ValueError(f"poll must be a positive number of seconds, got {poll!r}")
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.wait = wait
        self.poll = poll
        self.record: dict[str, Any] | None = None  # what we wrote, while we hold the lock

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self.record is not None

    def acquire(self) -> None:
        """Take the lock, taking over a stale one and waiting up to ``wait`` seconds.

        Raises:
            CellLockedError: another live process holds it (after ``wait`` seconds, if given).
            RuntimeError: this object already holds it.
        """
        if self.held:
            raise RuntimeError(f"{self.path} is already held by this CellLock")
        self.folder.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        while True:
            if self._create():
                return
            holder, mtime = _read(self.path)
            if mtime is None:
                continue  # released between our create and our read: try again at once
            if _stale_reason(holder, mtime) is not None and self._take_over():
                return
            waited = time.monotonic() - start
            if self.wait is None or waited >= self.wait:
                holder, _ = _read(self.path)  # the latest owner, for the message
                raise CellLockedError(self.path, holder or {}, waited=None if self.wait is None else waited)
            time.sleep(min(self.poll, self.wait - waited))

    def release(self) -> None:
        """Remove the lock file if it is still ours (a no-op when not held)."""
        record, self.record = self.record, None
        if record is None:
            return
        holder, _ = _read(self.path)
        if holder is None or holder["token"] != record["token"]:
            log.warning("%s: not removing the lock, it is no longer ours (now held by %s)", self.path,
                        _describe(holder))
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def __enter__(self) -> CellLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.release()

    def _create(self) -> bool:
        """One ``O_EXCL`` attempt: True when the lock file is now ours."""
        record = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"),
                  "token": secrets.token_hex(16)}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(record, handle)
        except BaseException:
            with contextlib.suppress(OSError):  # half written: nobody should wait on it
                os.unlink(self.path)
            raise
        # Had we stalled for GARBAGE_GRACE_S between create and write, another process may
        # have taken our empty file over; then the path is theirs and we must not hold.
        holder, _ = _read(self.path)
        if holder is None or holder["token"] != record["token"]:
            log.warning("%s: our lock file was taken over before we wrote it (now %s)", self.path,
                        _describe(holder))
            return False
        self.record = record
        return True

    def _take_over(self) -> bool:
        """Remove a stale lock and create ours, judging staleness again under the guard."""
        with _guard(self.folder / GUARD_NAME):
            holder, mtime = _read(self.path)
            if mtime is None:
                return self._create()
            reason = _stale_reason(holder, mtime)
            if reason is None:
                return False  # someone else took it over first, or its owner came to life
            log.warning("%s: taking over a stale lock: %s", self.path, reason)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return self._create()


def owner(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The record in ``<folder>/lock``, for display.

    Returns:
        ``None`` when the folder is not locked; ``{}`` when the lock file cannot be read or
        parsed (being written, or garbage); otherwise ``host``, ``pid``, ``started``, ``token``.
    """
    holder, mtime = _read(Path(folder) / LOCK_NAME)
    return None if mtime is None else (holder or {})


@contextlib.contextmanager
def _guard(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block."""
    if fcntl is None:
        log.warning("%s: no flock on this platform; the takeover below is not guarded", path)
        yield
        return
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as error:  # e.g. ENOSYS/ENOLCK on filesystems mounted without flock
            log.warning("%s: flock failed (%s); the takeover below is not guarded", path, error)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _read(path: Path) -> tuple[dict[str, Any] | None, float | None]:
    """``(record, mtime)`` of a lock file: record ``None`` when garbage, mtime ``None`` when absent."""
    try:
        with open(path, "rb") as handle:
            mtime = os.fstat(handle.fileno()).st_mtime
            data = handle.read(1 << 16)
    except FileNotFoundError:
        return None, None
    except OSError:  # unreadable: judged like garbage, by its age
        try:
            return None, path.stat().st_mtime
        except FileNotFoundError:
            return None, None
    try:
        record = json.loads(data)
    except ValueError:
        return None, mtime
    valid = (isinstance(record, dict) and isinstance(record.get("host"), str)
             and isinstance(record.get("token"), str) and type(record.get("pid")) is int
             and 0 < record["pid"] < 2**31)
    return (record if valid else None), mtime


def _stale_reason(holder: dict[str, Any] | None, mtime: float) -> str | None:
    """Why a lock file is stale, or ``None`` when its owner may be alive."""
    if holder is None:
        age = time.time() - mtime
        return f"unreadable lock file, last written {age:.0f} s ago" if age > GARBAGE_GRACE_S else None
    if holder["host"] != socket.gethostname():
        return None  # cannot tell: never taken over
    pid, who = holder["pid"], _describe(holder)
    if not _pid_alive(pid):
        return f"its owner ({who}) is no longer running"
    started = _parse_time(holder.get("started"))
    since = _process_start(pid)
    if started is not None and since is not None and since > started + PID_REUSE_SLACK_S:
        return (f"its owner ({who}) is gone; pid {pid} now belongs to a process started "
                f"{since - started:.0f} s after the lock was written")
    return None


def _describe(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "an unreadable lock file"
    return f"pid {holder['pid']} on host {holder['host']}, since {holder.get('started', '?')}"


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs on this host; a zombie (exited, not yet reaped) counts as dead."""
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return _proc_stat(pid)[0] != "Z"


def _process_start(pid: int) -> float | None:
    """Start time (epoch seconds) of ``pid`` from Linux's ``/proc``; ``None`` elsewhere."""
    ticks = _proc_stat(pid)[1]
    if ticks is None:
        return None
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            boot = next(float(line.split()[1]) for line in handle if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, ValueError):
        return None


def _proc_stat(pid: int) -> tuple[str | None, int | None]:
    """``(state, start time in clock ticks since boot)`` from ``/proc/<pid>/stat``, or Nones."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()  # the command name may hold spaces
        return fields[0], int(fields[19])  # fields 3 (state) and 22 (starttime) of proc(5)
    except (OSError, IndexError, ValueError):
        return None, None


def _parse_time(text: Any) -> float | None:
    try:
        return datetime.fromisoformat(text).timestamp()
    except (TypeError, ValueError):
        return None

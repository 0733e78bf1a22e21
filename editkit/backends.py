"""Where a study's cells run: one after another in this process, or as tasks of a Ray cluster.

``local`` is :func:`editkit.runs.run_study`: the chosen cells in grid order, each model
loaded once for its consecutive cells. ``ray`` is :func:`run_study_ray`: every chosen cell
is one Ray task that loads the cell's model and runs it through the same
:func:`editkit.runs.run_one_cell`, so the files, the cell locks, the checksums and
resume are those of the local backend. Every worker writes into the one results root,
which must therefore be a path that every node sees (a shared filesystem: NFS, Lustre,
a cluster's home or scratch).

Resources: a task asks for ``cpus_per_cell`` CPUs, and also ``gpus_per_cell`` GPUs
when the cell's device asks for an accelerator (``auto`` or any device but ``cpu``) and
the cluster has GPUs; Ray then makes exactly that GPU visible to the worker.

Retries: a task whose worker or node dies (killed, out of memory, preempted) is run
again up to ``retries`` times, as is one that raised an error that may pass on a
second try (:func:`retried_exceptions`: a shared filesystem's ``OSError``, running out
of memory); other errors (a bad configuration, a bug) fail at once. A retried cell
resumes from its last verified checkpoint: the dead worker's lock is stale and is
taken over (:mod:`editkit.locks`). A lock is judged where it was written: when the
retry lands on another node, the lock's host is asked, through a zero-CPU task pinned
to it, to release the lock if its owner is dead there.

``ray`` is imported only here and only when a Ray study runs; ``import editkit`` never
needs it (``pip install 'editkit[ray]'``).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from tqdm.auto import tqdm

from .grid import Cell, StudyConfig
from .locks import CellLock, CellLockedError
from .results import Results, load_results
from .runs import load_cell_model, run_one_cell, select_cells

__all__ = ["BACKENDS", "RAY_INSTALL", "RayOptions", "CellFailure", "CellsFailedError", "import_ray",
           "cell_resources", "retried_exceptions", "run_study_ray", "release_stale_lock_on_owner_host"]

log = logging.getLogger(__name__)

BACKENDS = ("local", "ray")
RAY_INSTALL = "pip install 'editkit[ray]'"


@dataclass(frozen=True)
class RayOptions:
    """How :func:`run_study_ray` reaches Ray and what each cell's task asks of it.

    Attributes:
        address: the cluster to connect to (``head:6379``, ``auto``, or
            ``ray://head:10001`` with ``ray[client]``); None runs ``ray.init()``, which
            starts a local Ray instance. A Ray this process already started is used as it is.
        retries: how often a cell is run again after its worker died or it raised an
            error of :func:`retried_exceptions`.
        cpus_per_cell: CPUs each cell's task asks for.
        gpus_per_cell: GPUs each cell's task asks for, when it wants an accelerator and
            the cluster has GPUs.
    """

    address: str | None = None
    retries: int = 2
    cpus_per_cell: float = 1.0
    gpus_per_cell: float = 1.0

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        for name in ("cpus_per_cell", "gpus_per_cell"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class CellFailure:
    """A cell whose task failed for good (after its retries).

    Attributes:
        index: the cell's index (``--cell``).
        axes: its grid coordinates.
        error: the error, one line: its type and message.
        details: the remote traceback of an error the cell raised (empty for a lost worker).
    """

    index: int
    axes: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    details: str = ""

    def describe(self) -> str:
        where = " · ".join(str(self.axes[key]) for key in ("model", "method", "dataset") if key in self.axes)
        return (f"cell {self.index} ({where}, seed {self.axes.get('seed')}, batch {self.axes.get('edit_batch_size')})"
                f" failed: {self.error}")


class CellsFailedError(RuntimeError):
    """Some cells of a Ray study failed after their retries; the others ran to the end.

    Attributes:
        failures: one :class:`CellFailure` per failed cell.
        locked: the cells another process held (also skipped).
    """

    def __init__(self, failures: Sequence[CellFailure], locked: Sequence[CellLockedError] = ()) -> None:
        self.failures = list(failures)
        self.locked = list(locked)
        lines = [failure.describe() for failure in self.failures]
        lines += [f"skipped, locked: {error}" for error in self.locked]
        super().__init__(f"{len(self.failures)} cell(s) failed:\n" + "\n".join(lines))


def import_ray() -> ModuleType:
    """The ``ray`` module, or an ImportError that says how to install it."""
    try:
        import ray
    except ImportError as error:
        raise ImportError(f"the Ray backend needs ray, which is not installed: {RAY_INSTALL}") from error
    return ray


def wants_accelerator(device: str) -> bool:
    """Whether a cell loaded on ``device`` asks for an accelerator (``auto``, or any device but the CPU)."""
    import torch

    return device == "auto" or torch.device(device).type != "cpu"


def cell_resources(cell: Cell, options: RayOptions, cluster_gpus: float) -> dict[str, float]:
    """The Ray resource request of ``cell``'s task: ``num_cpus``, and ``num_gpus`` where it can use one."""
    resources = {"num_cpus": options.cpus_per_cell}
    if cluster_gpus > 0 and wants_accelerator(cell.device):
        resources["num_gpus"] = options.gpus_per_cell
    return resources


def retried_exceptions() -> list[type[BaseException]]:
    """Errors inside a cell that may pass on a second try: the shared filesystem's, and out of memory.

    Any other error of a cell (a bad value, a missing dataset record, a bug) would fail
    again, so it is reported at once instead of being run ``retries`` more times.
    """
    import torch

    return [OSError, MemoryError, torch.OutOfMemoryError]


def run_study_ray(config: StudyConfig, options: RayOptions | None = None, *, cells: Sequence[int] | None = None,
                  progress: bool = True, wait: float | None = None,
                  on_checkpoint: Callable[[int, str], None] | None = None) -> Results:
    """Run (or resume) the cells of ``config`` as Ray tasks and return everything under its results root.

    Args:
        config: the study; ``results_dir`` must be a path every Ray node sees.
        options: cluster address, retries and per-cell resources (default :class:`RayOptions`).
        cells: run only these cell indices (see :meth:`StudyConfig.cells`); default all.
        progress: a progress bar over finished cells (workers show none).
        wait: seconds a task waits for a cell another process holds (None: skip it at once).
        on_checkpoint: called in the worker as ``on_checkpoint(n_edits, run_id)`` after
            each checkpoint is saved; it must be picklable.

    Every cell runs to its end, or fails, before this returns; a Ray instance it started
    is shut down again.

    Raises:
        ImportError: ray is not installed.
        CellsFailedError: some cells failed after their retries (each named, with its error).
        CellLockedError: no cell failed, but another process held some (rerun later, or pass ``wait``).
    """
    ray = import_ray()
    options = options or RayOptions()
    chosen = select_cells(config, cells)
    started = not ray.is_initialized()
    if started:
        ray.init(address=options.address)
    elif options.address is not None:
        log.info("ray is already initialised in this process; --address %s is not used", options.address)
    try:
        gpus = float(ray.cluster_resources().get("GPU", 0.0))
        shared = ray.put(config)
        task = ray.remote(_cell_task)
        refs = {}
        for cell in chosen:
            request = cell_resources(cell, options, gpus)
            log.debug("cell %d asks for %s", cell.index, request)
            ref = task.options(**request, max_retries=options.retries, retry_exceptions=retried_exceptions(),
                               name=f"editkit cell {cell.index}").remote(shared, cell.index, wait, on_checkpoint)
            refs[ref] = cell
        log.info("%d cell(s) submitted to Ray (%g GPU(s) in the cluster), results in %s", len(refs), gpus,
                 config.results_dir)
        failures, locked = _collect(ray, refs, progress, options.retries)
    finally:
        if started:
            ray.shutdown()
    if failures:
        raise CellsFailedError(failures, locked)
    if locked:
        raise locked[0]  # each was named in a warning when it came back
    return load_results(config.results_dir)


def _collect(ray: ModuleType, refs: dict[Any, Cell], progress: bool, retries: int
             ) -> tuple[list[CellFailure], list[CellLockedError]]:
    """Wait for every task, reporting each as it finishes; the failed and the locked cells."""
    failures: list[CellFailure] = []
    locked: list[CellLockedError] = []
    pending = list(refs)
    with tqdm(total=len(refs), desc="cells", unit="cell", disable=not progress) as bar:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                cell = refs[ref]
                try:
                    outcome = ray.get(ref)
                except ray.exceptions.RayError as error:
                    failure = _failure(ray, cell, error, retries)
                    log.error("%s", "\n".join(filter(None, (failure.describe(), failure.details))))
                    failures.append(failure)
                else:
                    if "locked" in outcome:
                        log.warning("cell %d skipped: %s", cell.index, outcome["locked"])
                        locked.append(CellLockedError(Path(outcome["path"]), outcome["owner"],
                                                      waited=outcome["waited"]))
                    else:
                        log.info("cell %d done: %s (pid %s on %s)", cell.index, outcome["run_id"], outcome["pid"],
                                 outcome["host"])
                bar.update(1)
    return failures, locked


def _failure(ray: ModuleType, cell: Cell, error: Exception, retries: int) -> CellFailure:
    cause = getattr(error, "cause", None) if isinstance(error, ray.exceptions.RayTaskError) else None
    if cause is not None:  # the cell's own exception, raised in the worker; details: the remote traceback
        return CellFailure(cell.index, cell.axes(), f"{type(cause).__name__}: {cause}", str(error))
    # The worker or its node was lost on the last of its runs (killed, out of memory, preempted).
    message = " ".join(str(error).split())
    return CellFailure(cell.index, cell.axes(), f"{type(error).__name__}: {message} (run {retries + 1} time(s))")


def _cell_task(config: StudyConfig, index: int, wait: float | None,
               on_checkpoint: Callable[[int, str], None] | None) -> dict[str, Any]:
    """The body of one cell's Ray task: load the model, run the cell; say so if another process holds it.

    An error propagates, and Ray runs the task again if it is one of
    :func:`retried_exceptions`; a worker that dies is always run again.
    """
    (cell,) = select_cells(config, [index])
    lm = load_cell_model(cell)

    def attempt() -> dict[str, Any] | CellLockedError:
        try:
            run_id = run_one_cell(config, index, lm=lm, progress=False, on_checkpoint=on_checkpoint, wait=wait)
        except CellLockedError as error:
            return error
        return {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid()}

    outcome = attempt()
    # A lock written on another node is judged there: a retry after a lost worker may land elsewhere.
    if isinstance(outcome, CellLockedError) and release_stale_lock_on_owner_host(outcome.path.parent, outcome.owner):
        outcome = attempt()
    if isinstance(outcome, CellLockedError):
        return {"locked": str(outcome), "path": str(outcome.path), "owner": outcome.owner, "waited": wait}
    return outcome


def release_stale_lock_on_owner_host(folder: str | os.PathLike, owner: dict[str, Any], *,
                                     here: str | None = None) -> bool:
    """Ask the host that wrote a cell's lock to take it over if its owner is dead there, and release it.

    Whether a process is alive can be told only on its own host (:mod:`editkit.locks`).
    When the lock's host is another live node of the Ray cluster, a zero-CPU task pinned
    to that node takes the lock (which takes a stale one over, with a warning there) and
    releases it at once.

    Args:
        folder: the cell's folder.
        owner: the lock's record (``host``, ``pid``, ...), as :class:`CellLockedError` gives it.
        here: this host's name (default: ``socket.gethostname()``); a lock of this host
            was judged already, so nothing is asked.

    Returns:
        True when the lock is gone; False when its owner is alive, or its host is this
        host, or no single live Ray node has that host name (then nobody can tell).
    """
    host = owner.get("host")
    if not host or host == (here or socket.gethostname()):
        return False
    ray = import_ray()
    nodes = [node for node in ray.nodes() if node.get("Alive") and node.get("NodeManagerHostname") == host]
    if len(nodes) != 1:
        log.warning("%s: its lock's host %s is %s, so whether its owner is alive cannot be told", folder, host,
                    "not a live node of this Ray cluster" if not nodes else "the name of several Ray nodes")
        return False
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(_release_if_stale).options(
        num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(nodes[0]["NodeID"], soft=False))
    return bool(ray.get(probe.remote(str(folder))))


def _release_if_stale(folder: str) -> bool:
    """On the lock's host: take the cell's lock (a stale one is taken over) and release it; whether it was free."""
    try:
        with CellLock(folder):
            return True
    except CellLockedError:
        return False

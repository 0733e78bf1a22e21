"""Run a study grid: every pending cell, or chosen ones, one model load per model.

The pieces, each readable alone:

* :mod:`editkit.grid`: the study file (:class:`StudyConfig`) and its cells;
* :mod:`editkit.sequential`: one cell's sequential run (stepping, collapse, resume);
* :mod:`editkit.protocol`: what is measured at a checkpoint;
* :mod:`editkit.store`: the files of a cell, written atomically;
* :mod:`editkit.results`: the whole results root read back as tidy frames.

``load_study`` and ``StudyResult`` are the names these had before the grid;
they remain as aliases of :func:`editkit.results.load_results` and :class:`Results`.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .editors import resolve_params
from .grid import DEFAULT_CHECKPOINTS, Cell, StudyConfig
from .locks import CellLockedError, owner
from .modelinfo import ModelInfo, describe_model
from .results import Results, load_results
from .store import RunStore, write_items

if TYPE_CHECKING:
    from .models import LoadedModel

__all__ = ["StudyConfig", "Cell", "Results", "StudyResult", "run_study", "run_one_cell", "select_cells",
           "load_cell_model", "load_study", "load_results", "cell_states", "DEFAULT_CHECKPOINTS", "write_items"]

log = logging.getLogger(__name__)

StudyResult = Results
load_study = load_results


def select_cells(config: StudyConfig, cells: Sequence[int] | None) -> list[Cell]:
    """The cells of ``config`` with these indices, in grid order (None: all).

    Raises:
        IndexError: an index outside the grid (the message gives its size).
    """
    everything = config.cells()
    if cells is None:
        return everything
    bad = [i for i in cells if not 0 <= i < len(everything)]
    if bad:
        raise IndexError(f"cells {bad} are not in this study: it has {len(everything)} (0..{len(everything) - 1})")
    return [everything[i] for i in sorted(set(cells))]


def run_study(config: StudyConfig, progress: bool = True, *, cells: Sequence[int] | None = None,
              lm: LoadedModel | None = None, on_checkpoint: Callable[[int, str], None] | None = None,
              wait: float | None = None) -> Results:
    """Run (or resume) the cells of ``config`` and return everything saved under its results root.

    Args:
        config: the study; ``results_dir`` is the results root shared by all cells.
        progress: progress bars over edits and benchmark items.
        cells: run only these cell indices (see :meth:`StudyConfig.cells`); default all.
        lm: an already loaded model to use for every cell instead of loading the cells'
            models (only for a study of one model).
        on_checkpoint: called as ``on_checkpoint(n_edits, run_id)`` after each checkpoint is saved.
        wait: seconds to wait for a cell that another process holds (None: skip it at once).

    Each model is loaded once for all its cells and freed before the next model is
    loaded. Every model is back at its unedited weights when this returns.

    Raises:
        CellLockedError: after every free cell has run, if another process held some
            cell (each is named; rerun later, or pass ``wait``).
    """
    chosen = select_cells(config, cells)
    if lm is not None and len({c.model for c in chosen}) > 1:
        raise ValueError("lm= serves a study of one model; this one has several")
    loaded: tuple[tuple[str, str, str], LoadedModel] | None = None
    model: LoadedModel | None = None
    busy: list[CellLockedError] = []
    infos: dict[tuple, ModelInfo] = {}
    for cell in chosen:
        if lm is None and _is_done(config, cell, infos):  # e.g. a notebook rerun over saved results
            log.info("cell %d (%s, %s) is done: its model is not loaded", cell.index, cell.model, cell.method)
            continue
        key = (cell.model, cell.dtype, cell.device)
        if lm is not None:
            model = lm
        elif loaded is not None and loaded[0] == key:
            model = loaded[1]
        else:
            loaded = model = None  # free the previous model before loading the next
            gc.collect()
            loaded = (key, load_cell_model(cell))
            model = loaded[1]
        try:
            run_one_cell(config, cell.index, lm=model, progress=progress, on_checkpoint=on_checkpoint, wait=wait)
        except CellLockedError as error:  # another worker has it: run the others, then say so
            log.warning("cell %d skipped: %s", cell.index, error)
            busy.append(error)
    if busy:  # each was named in a warning when it was skipped
        raise busy[0]
    return load_results(config.results_dir)


def load_cell_model(cell: Cell) -> LoadedModel:
    """Load ``cell``'s model as the cell asks (its ``dtype`` and ``device``)."""
    from .models import load_model

    log.info("loading %s (%s on %s) for cell %d", cell.model, cell.dtype, cell.device, cell.index)
    return load_model(cell.model, dtype=cell.dtype, device=cell.device)


def run_one_cell(config: StudyConfig, index: int, *, lm: LoadedModel | None = None, progress: bool = True,
                 on_checkpoint: Callable[[int, str], None] | None = None, wait: float | None = None) -> str:
    """Run (or resume) cell ``index`` of ``config``; returns its run id.

    The one path by which every backend runs a cell: :func:`run_study` here (with the
    model it keeps loaded for consecutive cells) and :mod:`editkit.backends` in a Ray task.

    Args:
        config: the study; the cell is saved under its ``results_dir``.
        index: the cell's index in :meth:`StudyConfig.cells`.
        lm: the cell's model, already loaded (default: load it with :func:`load_cell_model`).
        progress, on_checkpoint, wait: as for :func:`editkit.sequential.run_cell`.

    Raises:
        CellLockedError: another live process works on this cell.
    """
    from .sequential import run_cell

    (cell,) = select_cells(config, [index])
    model = lm if lm is not None else load_cell_model(cell)
    return run_cell(cell, model, config.results_dir, progress=progress, on_checkpoint=on_checkpoint, wait=wait)


def cell_states(config: StudyConfig) -> list[dict[str, object]]:
    """One row per cell: its index, axes, run id and how far it got in ``results_dir``.

    No model is loaded: the editor's hyperparameters are resolved from the model's
    name and type (catalog, ``config.json``), which is all the packaged per-model
    defaults depend on. The state is ``done`` (every checkpoint saved),
    ``k/m checkpoints``, ``pending``, or ``unknown`` when the model's type cannot be
    told offline (a hub id that is not cached); only verified checkpoints count, and
    a cell another process holds says so.
    """
    rows = []
    infos: dict[tuple, ModelInfo] = {}  # one look-up per model, not per cell
    for cell in config.cells():
        row: dict[str, object] = {"cell": cell.index, **cell.axes(), "run_id": None, "state": "unknown"}
        store = _cell_store(config, cell, infos)
        if store is not None:
            finished = set(store.verified())
            wanted = cell.checkpoints()
            have = [n for n in wanted if n in finished]
            row["run_id"] = store.folder.name
            row["state"] = ("done" if len(have) == len(wanted) else
                            f"{len(have)}/{len(wanted)} checkpoints" if have else "pending")
            holder = owner(store.folder)
            if holder is not None:
                row["state"] += f" (running: pid {holder.get('pid')} on {holder.get('host')})"
        rows.append(row)
    return rows


def _cell_store(config: StudyConfig, cell: Cell, infos: dict[tuple, ModelInfo]) -> RunStore | None:
    """The store of ``cell`` without loading its model; None when the model's type cannot be told offline.

    ``infos`` caches one :func:`describe_model` per model across calls.
    """
    key = (cell.model, tuple(sorted(cell.declared_info.items())))
    if key not in infos:
        infos[key] = describe_model(cell.model, cell.declared_info)
    info = infos[key]
    if info.model_type is None:
        return None
    params = resolve_params(cell.method, info, **cell.editor_overrides)
    return RunStore(Path(config.results_dir) / cell.run_id(params.digest()))


def _is_done(config: StudyConfig, cell: Cell, infos: dict[tuple, ModelInfo]) -> bool:
    """Every checkpoint of ``cell`` is saved and passes verification (nothing to run, no model to load)."""
    store = _cell_store(config, cell, infos)
    wanted = set(cell.checkpoints())
    # Hash the files only when every checkpoint's folder is there: a pending cell costs a listing.
    if store is None or not store.folder.is_dir() or not wanted <= set(store.present()):
        return False
    return wanted <= set(store.verified())

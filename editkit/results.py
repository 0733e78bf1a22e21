"""Read a whole results root back as tidy frames, one column per grid axis.

:func:`load_results` walks every cell folder under a root (see :mod:`editkit.store`)
and returns :class:`Results`: ``scores``, ``items``, ``edit_quality``, ``generations``,
``health`` (held-out perplexity and weight statistics, :mod:`editkit.health`; one row
per ``metric``, with ``parameter`` set on per-matrix rows) and ``checkpoints``, each with
the columns ``run_id``, ``model``, ``method``, ``dataset``, ``seed``, ``edit_batch_size``
and ``n_edits``; and ``models``, one row of metadata per model (family, parameter count,
instruct or base, layers), to join on ``model`` (:meth:`Results.with_models`). :attr:`Results.deltas` pairs every edited
checkpoint's items with its unedited model's (:func:`editkit.paired.deltas`): the mean
change per task of the gold log-likelihood, the gold's probability share and accuracy,
with paired intervals and p-values.

Folders written before the study grid (single-model RQ1 runs) load as they are: their
axes are read from the ``config.json`` they have (``dataset``, ``seed``) and they were
all edited one request at a time (``edit_batch_size`` 1).

Every checkpoint is verified before its files are read (:meth:`RunStore.problems`): one
with a missing meta.json, a missing file or a checksum mismatch is left out of the frames,
named in a warning and listed in :attr:`Results.problems`, never dropped silently.
:func:`verify_results` checks every file of a whole root (``python -m editkit verify``).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import pandas as pd

from . import paired
from .modelinfo import INFO_FIELDS, describe_model
from .store import AXES, EMPTY_COLUMNS, FRAMES, ResultsFileError, RunStore, read_json

__all__ = ["Results", "load_results", "verify_results", "KEY_COLUMNS", "PROBLEM_COLUMNS"]

log = logging.getLogger(__name__)

KEY_COLUMNS = ("run_id", *AXES, "n_edits")
PROBLEM_COLUMNS = ("run_id", "n_edits", "problem")


@dataclass
class Results:
    """Tidy frames of every cell under ``results_dir``."""

    results_dir: Path
    scores: pd.DataFrame
    edit_quality: pd.DataFrame
    generations: pd.DataFrame
    checkpoints: pd.DataFrame
    health: pd.DataFrame = field(default_factory=pd.DataFrame)
    items: pd.DataFrame = field(default_factory=pd.DataFrame)
    models: pd.DataFrame = field(default_factory=pd.DataFrame)
    problems: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=PROBLEM_COLUMNS))

    def with_models(self, frame: pd.DataFrame) -> pd.DataFrame:
        """``frame`` with the model metadata columns (family, n_params, instruct, ...) joined on ``model``."""
        if frame.empty or self.models.empty:
            return frame.assign(**{c: pd.Series(dtype=object) for c in INFO_FIELDS if c not in frame})
        return frame.merge(self.models, on="model", how="left", suffixes=("", "_model"))

    def select(self, **axes: Any) -> Results:
        """The results of the cells whose ``axis`` is one of the given values, e.g. ``select(method=["memit"])``.

        Raises:
            KeyError: an axis that no frame has.
        """
        frames = {f.name: getattr(self, f.name) for f in fields(self)
                  if isinstance(getattr(self, f.name), pd.DataFrame)}
        for axis in axes:
            if not any(axis in frame.columns for frame in frames.values()):
                raise KeyError(f"no results column {axis!r}; axes: {', '.join(AXES)}")
        chosen = {}
        for name, frame in frames.items():
            for axis, values in axes.items():
                if axis in frame.columns:
                    wanted = [values] if isinstance(values, str) else list(values)
                    frame = frame[frame[axis].isin(wanted)].reset_index(drop=True)
            chosen[name] = frame
        return replace(self, **chosen)

    @functools.cached_property
    def deltas(self) -> pd.DataFrame:
        """Paired change of every edited checkpoint against its run's unedited model, per task and metric.

        :func:`editkit.paired.deltas` of :attr:`items` with its defaults (2000 resamples,
        seed 0, 95% intervals), computed on first use and kept. Empty, with the columns
        :data:`editkit.paired.DELTA_COLUMNS`, when the items were not loaded or no run has
        an ``n_edits == 0`` checkpoint.
        """
        return paired.deltas(self.items)


def _axes_of(folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The grid coordinates of a cell folder, from its checkpoint meta or (older runs) its config."""
    if all(axis in meta for axis in AXES):
        return {axis: meta[axis] for axis in AXES}
    config = _read_json(folder / "config.json") or {}
    # The study's model name (what the grid axis is), which is also the loaded model's name
    # unless a test handed in a model object of another name.
    return {"model": config.get("model", meta.get("model")), "method": meta.get("method", config.get("method")),
            "dataset": config.get("dataset", "counterfact"), "seed": config.get("seed", 0), "edit_batch_size": 1}


def _read_json(path: Path) -> dict[str, Any] | None:
    """A cell's optional metadata file: None when missing; unreadable is warned about, then skipped."""
    if not path.exists():
        return None
    try:
        return read_json(path, "its cell's metadata is skipped")
    except ResultsFileError as error:
        log.warning("%s", error)
        return None


def _model_rows(cells: dict[Path, dict[str, Any]]) -> pd.DataFrame:
    rows: dict[str, dict[str, Any]] = {}
    for folder, axes in cells.items():
        manifest = _read_json(folder / "manifest.json") or {}
        info = manifest.get("model_info") or describe_model(axes["model"]).to_dict()
        known = rows.setdefault(axes["model"], {"model": axes["model"]})
        for key in INFO_FIELDS:  # the first cell that knows a value wins (all agree for one model)
            if known.get(key) is None:
                known[key] = info.get(key)
    columns = ["model", *INFO_FIELDS]
    return pd.DataFrame(list(rows.values()), columns=columns)


def _checkpoint_folders(root: Path) -> list[tuple[RunStore, int]]:
    found = []
    for checkpoints in sorted(root.glob("*/checkpoints")):
        store = RunStore(checkpoints.parent)
        found += [(store, n) for n in store.present()]
    return found


def verify_results(results_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """Check every file of every checkpoint under a results root; one row per problem (empty: all verified).

    Columns ``run_id``, ``n_edits`` and ``problem`` (which names the file). Also
    reported: unreadable cell ``config.json``/``reference.json`` files and checkpoints
    set aside earlier (``<n>.corrupt-*``).
    """
    rows = []
    root = Path(results_dir)
    for store, n in _checkpoint_folders(root):
        rows += [{"run_id": store.folder.name, "n_edits": n, "problem": p} for p in store.problems(n)]
    for cell in sorted(p.parent for p in root.glob("*/checkpoints")):
        for name in ("config.json", "reference.json"):
            if (cell / name).exists():
                try:
                    read_json(cell / name, "")
                except ResultsFileError as error:
                    rows.append({"run_id": cell.name, "n_edits": None, "problem": str(error).rstrip("; ")})
        for aside in sorted((cell / "checkpoints").glob("*.corrupt-*")):
            rows.append({"run_id": cell.name, "n_edits": int(aside.name.split(".")[0]),
                         "problem": f"{aside} was set aside after failing verification (inspect, then delete)"})
    return pd.DataFrame(rows, columns=list(PROBLEM_COLUMNS))


def load_results(results_dir: str | os.PathLike[str], *, items: bool = True) -> Results:
    """Read every cell saved under ``results_dir`` into tidy frames.

    Args:
        results_dir: a results root (a study's ``results_dir``).
        items: also read the per-item benchmark rows (the largest frame).

    Returns:
        :class:`Results`; frames are sorted by run and number of edits, and are empty
        (with their columns) when nothing has been saved yet.
    """
    root = Path(results_dir)
    names = [name for name in FRAMES if name != "checkpoints" and (items or name != "items")]
    collected: dict[str, list[pd.DataFrame]] = {name: [] for name in FRAMES}
    cells: dict[Path, dict[str, Any]] = {}
    problems = []
    wanted = tuple(f"{name}.parquet" for name in names)
    for store, n in _checkpoint_folders(root):
        found = store.problems(n, files=wanted)
        if found:
            log.warning("checkpoint %s is left out: %s", store.checkpoint_dir(n), "; ".join(found))
            problems += [{"run_id": store.folder.name, "n_edits": n, "problem": p} for p in found]
            continue
        folder = store.checkpoint_dir(n)
        meta = read_json(folder / "meta.json", "")
        cell_folder = store.folder
        axes = _axes_of(cell_folder, meta)
        cells.setdefault(cell_folder, axes)
        keys = {"run_id": meta.get("run_id", cell_folder.name), **axes, "n_edits": meta["n_edits"]}
        timings = {k: meta.get(k) for k in EMPTY_COLUMNS["checkpoints"]}
        timings["attempts"] = len(meta.get("attempts") or [None])  # runs before attempts were kept: one
        collected["checkpoints"].append(pd.DataFrame([{**keys, **timings}]))
        for name in names:
            path = folder / f"{name}.parquet"
            if path.exists():
                frame = pd.read_parquet(path)
                if len(frame):
                    collected[name].append(frame.assign(**keys))
    frames: dict[str, pd.DataFrame] = {}
    for name, parts in collected.items():
        frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
            columns=[*KEY_COLUMNS, *EMPTY_COLUMNS[name]])
        if name == "scores" and len(frame):
            status = pd.concat(collected["checkpoints"], ignore_index=True).set_index(["run_id", "n_edits"])["status"]
            frame["status"] = [status.get((r, n), "ok") for r, n in zip(frame["run_id"], frame["n_edits"])]
        if len(frame):
            frame = frame.sort_values(["run_id", "n_edits"], kind="stable").reset_index(drop=True)
        frames[name] = frame
    return Results(results_dir=root, models=_model_rows(cells),
                   problems=pd.DataFrame(problems, columns=list(PROBLEM_COLUMNS)), **frames)

"""Read a whole results root back as tidy frames, one column per grid axis.

:func:`load_results` walks every cell folder under a root (see :mod:`editkit.store`)
and returns :class:`Results`: ``scores``, ``items``, ``edit_quality``, ``generations``
and ``checkpoints``, each with the columns ``run_id``, ``model``, ``method``,
``dataset``, ``seed``, ``edit_batch_size`` and ``n_edits``; and ``models``, one row of
metadata per model (family, parameter count, instruct or base, layers), to join on
``model`` (:meth:`Results.with_models`).

Folders written before the study grid (single-model RQ1 runs) load as they are: their
axes are read from the ``config.json`` they have (``dataset``, ``seed``) and they were
all edited one request at a time (``edit_batch_size`` 1).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .modelinfo import INFO_FIELDS, describe_model
from .store import AXES, EMPTY_COLUMNS, FRAMES

__all__ = ["Results", "load_results", "KEY_COLUMNS"]

log = logging.getLogger(__name__)

KEY_COLUMNS = ("run_id", *AXES, "n_edits")


@dataclass
class Results:
    """Tidy frames of every cell under ``results_dir``."""

    results_dir: Path
    scores: pd.DataFrame
    edit_quality: pd.DataFrame
    generations: pd.DataFrame
    checkpoints: pd.DataFrame
    items: pd.DataFrame = field(default_factory=pd.DataFrame)
    models: pd.DataFrame = field(default_factory=pd.DataFrame)

    def with_models(self, frame: pd.DataFrame) -> pd.DataFrame:
        """``frame`` with the model metadata columns (family, n_params, instruct, ...) joined on ``model``."""
        if frame.empty or self.models.empty:
            return frame.assign(**{c: pd.Series(dtype=object) for c in INFO_FIELDS if c not in frame})
        return frame.merge(self.models, on="model", how="left", suffixes=("", "_model"))


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
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        log.warning("%s is unreadable (%s); its cell's metadata is skipped", path, error)
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
    for meta_path in sorted(root.glob("*/checkpoints/[0-9]*/meta.json")):
        if not meta_path.parent.name.isdigit():
            continue
        meta = _read_json(meta_path)
        if meta is None:
            continue
        folder = meta_path.parent
        cell_folder = folder.parent.parent
        axes = _axes_of(cell_folder, meta)
        cells.setdefault(cell_folder, axes)
        keys = {"run_id": meta.get("run_id", cell_folder.name), **axes, "n_edits": meta["n_edits"]}
        collected["checkpoints"].append(pd.DataFrame([{**keys, **{k: meta.get(k) for k in EMPTY_COLUMNS["checkpoints"]}}]))
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
    return Results(results_dir=root, models=_model_rows(cells), **frames)

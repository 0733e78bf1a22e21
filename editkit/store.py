"""The results store: where one cell's files live, and how they are written and read.

A results root holds one folder per cell, ``<root>/<method>-<digest>/``::

    config.json, manifest.json        what was run (the cell, editor params, model metadata,
                                      digests, versions, git commit, data checksums)
    reference.json                    the unedited model's locality answers (computed once)
    checkpoints/<n:06d>/              one folder per finished checkpoint, written atomically:
        meta.json                     status ("ok" | "collapsed"), reason, timings
        scores.parquet                benchmark aggregates with 95% bootstrap CIs
        items.parquet                 per-item benchmark rows (prompts, outputs, correctness)
        edit_quality.parquet          "latest" (each edit right after its step) and
                                      "retention" (every edit so far, on the current model)
        edits.parquet                 per-edit immediate quality, timings and losses
        generations.parquet           greedy continuations of fixed probe prompts
        state.safetensors             every parameter the run has changed, as of n edits
        editor_state.pt               editor state beyond weights (templates, caches)
    checkpoints/<n:06d>.partial/      while checkpoint n is evaluated: one journal per task of
                                      the benchmark items finished so far (removed once saved)

A checkpoint folder appears only complete: it is written as ``<n>.tmp`` and renamed.
Folders written before the study grid have the same layout; their ``config.json`` holds
the single-model study and :mod:`editkit.results` reads both.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from .resources import atomic_write_text

__all__ = ["RunStore", "write_items", "write_json", "digest_into", "state_digest", "FRAMES", "AXES", "EMPTY_COLUMNS"]

# The tidy frames every store yields, and the grid axes each frame carries.
FRAMES = ("scores", "items", "edit_quality", "generations", "checkpoints")
AXES = ("model", "method", "dataset", "seed", "edit_batch_size")
EMPTY_COLUMNS = {
    "scores": ("task", "metric", "value", "ci_low", "ci_high", "n", "status"),
    "items": ("task",),
    "edit_quality": ("scope", "metric", "convention", "value", "ci_low", "ci_high", "n"),
    "generations": ("prompt", "output"),
    "checkpoints": ("status", "reason", "edit_seconds", "eval_seconds"),
}


def write_json(path: Path, payload: Any) -> None:
    """Write ``payload`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=str))


def write_items(frame: pd.DataFrame, path: Path) -> None:
    """Write per-item rows to parquet (answers, indices or texts, are stored as text)."""
    frame = frame.copy()
    for column in ("target", "prediction", "prediction_norm", "prediction_flexible"):
        if column in frame:  # index for choice tasks, text for generation: store as text
            frame[column] = frame[column].map(lambda v: None if v is None else str(v))
    frame.to_parquet(path, index=False)


def digest_into(digest: Any, value: Any) -> None:
    """Feed a nested structure of tensors, mappings, sequences and scalars to a hashlib digest."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"tensor {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        digest.update(f"dict {len(value)}".encode())
        for key in sorted(value, key=repr):
            digest.update(repr(key).encode())
            digest_into(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"seq {len(value)}".encode())
        for item in value:
            digest_into(digest, item)
    else:
        digest.update(repr(value).encode())


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str]:
    names = ("editkit", "torch", "transformers", "numpy", "pandas", "datasets", "safetensors")
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    found["python"] = platform.python_version()
    return found


class RunStore:
    """The files of one cell under ``folder`` (nothing is read or written on construction)."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)

    def checkpoint_dir(self, n: int) -> Path:
        return self.folder / "checkpoints" / f"{n:06d}"

    def partial_dir(self, n: int) -> Path:
        """Where checkpoint ``n``'s benchmark items are journaled while it is evaluated."""
        return self.folder / "checkpoints" / f"{n:06d}.partial"

    def finished(self) -> list[int]:
        """Checkpoints saved completely (their folder exists; ``.tmp`` and ``.partial`` do not count)."""
        root = self.folder / "checkpoints"
        return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit()) if root.exists() else []

    def write_manifest(self, config: dict[str, Any], manifest: dict[str, Any]) -> None:
        """``config.json`` (what defines the cell) and ``manifest.json`` (provenance, refreshed each start)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(self.folder / "config.json", config)
        write_json(self.folder / "manifest.json", {**manifest, "versions": _versions(), "git_commit": _git_commit(),
                                                   "updated": time.strftime("%Y-%m-%dT%H:%M:%S")})

    def read_reference(self) -> list:
        path = self.folder / "reference.json"
        return json.loads(path.read_text()) if path.exists() else []

    def write_reference(self, stored: list) -> None:
        write_json(self.folder / "reference.json", stored)

    def save_checkpoint(self, n: int, frames: dict[str, pd.DataFrame], meta: dict[str, Any],
                        weights: dict[str, torch.Tensor] | None, editor_state: dict[str, Any] | None) -> None:
        """Write checkpoint ``n`` atomically: frames, weights and editor state, then ``meta.json``, then rename."""
        final = self.checkpoint_dir(n)
        tmp = final.with_name(final.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        for name, frame in frames.items():
            write_items(frame, tmp / f"{name}.parquet")
        if weights:
            save_file({k: v.contiguous().cpu() for k, v in weights.items()}, tmp / "state.safetensors")
        if editor_state is not None:
            torch.save(editor_state, tmp / "editor_state.pt")
        write_json(tmp / "meta.json", meta)
        os.replace(tmp, final)
        shutil.rmtree(self.partial_dir(n), ignore_errors=True)

    def load_checkpoint(self, n: int, device: torch.device | str
                        ) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any] | None]:
        """Checkpoint ``n``'s meta, edited weights (possibly empty) and editor state (``None`` if not saved)."""
        folder = self.checkpoint_dir(n)
        meta = json.loads((folder / "meta.json").read_text())
        state_file = folder / "state.safetensors"
        weights = load_file(state_file, device=str(device)) if state_file.exists() else {}
        editor_file = folder / "editor_state.pt"
        editor_state = torch.load(editor_file, map_location=device, weights_only=False) if editor_file.exists() else None
        return meta, weights, editor_state


def state_digest(weights: dict[str, torch.Tensor], editor_state: dict[str, Any]) -> str:
    """SHA-256 of what a model's answers depend on beyond the base model: edited weights, editor state."""
    digest = hashlib.sha256()
    digest_into(digest, {"weights": weights, "editor": editor_state})
    return digest.hexdigest()

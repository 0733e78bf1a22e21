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
        health.parquet                held-out perplexity and changed-weight statistics
                                      (:mod:`editkit.health`; absent when health is off)
        state.safetensors             every parameter the run has changed, as of n edits
        editor_state.pt               editor state beyond weights (templates, caches)
        files.sha256.json             SHA-256 of every file above, written last
    checkpoints/<n:06d>.partial/      while checkpoint n is evaluated: one journal per task of
                                      the benchmark items finished so far, and the attempts
                                      at it (removed once saved)
    checkpoints/<n:06d>.corrupt-<time>/  a checkpoint that failed verification, set aside
    lock, lock.guard                  while a process works on the cell (:mod:`editkit.locks`)

A checkpoint's weights and editor state (``STATE_FILES``) may be absent while its checksums
name them: that is a *weight-free* checkpoint, the form a results root is committed in
(``.gitignore`` keeps the weights out). Its frames verify and are read as usual; a resume
from it replays the edits up to it (:mod:`editkit.sequential`) and checks the replayed
state against the digest its meta.json records. A weights file that is there but does not
match its checksum is still a problem.

A checkpoint folder appears only complete: it is written under a name unique to the
writing process and renamed. A checkpoint is *verified* when its meta.json is there and
every file matches ``files.sha256.json``; resume and :func:`editkit.results.load_results`
use only verified checkpoints and name every file that fails. Checkpoints written before
checksums existed (no ``files.sha256.json``) are verified as far as possible: meta.json
and every parquet file must parse. Folders written before the study grid have the same
layout; their ``config.json`` holds the single-model study and :mod:`editkit.results`
reads both.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file

from .resources import atomic_write_text, sha256_file

__all__ = ["RunStore", "ResultsFileError", "write_items", "write_json", "read_json", "digest_into", "state_digest",
           "FRAMES", "AXES", "EMPTY_COLUMNS", "CHECKSUMS", "STATE_FILES"]

log = logging.getLogger(__name__)

CHECKSUMS = "files.sha256.json"
# What a checkpoint holds beyond its frames: the model's changed weights and the editor's state.
STATE_FILES = ("state.safetensors", "editor_state.pt")

# The tidy frames every store yields, and the grid axes each frame carries.
FRAMES = ("scores", "items", "edit_quality", "generations", "health", "checkpoints")
AXES = ("model", "method", "dataset", "seed", "edit_batch_size")
EMPTY_COLUMNS = {
    "scores": ("task", "metric", "value", "ci_low", "ci_high", "n", "status"),
    "items": ("task",),
    "edit_quality": ("scope", "metric", "convention", "value", "ci_low", "ci_high", "n"),
    "generations": ("prompt", "output"),
    "health": ("metric", "value", "parameter", "ci_low", "ci_high"),
    "checkpoints": ("status", "reason", "edit_seconds", "eval_seconds"),
}


class ResultsFileError(ValueError):
    """A results file is missing, unreadable or fails its checksum; the message names it and says what to do."""


def read_json(path: Path, what_to_do: str) -> Any:
    """Parse a results JSON file, or raise :class:`ResultsFileError` naming it and ``what_to_do``."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultsFileError(f"{path} is missing; {what_to_do}") from None
    except (OSError, ValueError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ResultsFileError(f"{path} is unreadable ({type(error).__name__}: {error}); {what_to_do}") from None


def write_json(path: Path, payload: Any) -> None:
    """Write ``payload`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=str))


def write_items(frame: pd.DataFrame, path: Path) -> None:
    """Write per-item rows to parquet (answers, indices or texts, are stored as text)."""
    frame = frame.copy()
    for column in ("target", "prediction", "prediction_norm", "prediction_flexible"):
        if column in frame:  # index for choice tasks, text for generation: store as text
            frame[column] = frame[column].map(lambda v: None if v is None else str(v))
    if "correct" in frame and frame["correct"].dtype == object:
        values = [v for v in frame["correct"] if v is not None]
        if any(not isinstance(v, (bool, np.bool_)) for v in values):
            # Graded tasks (TruthfulQA MC2) score in [0, 1], others True/False: beside a graded
            # score a boolean is stored as 1.0 or 0.0, so one frame can hold every task.
            frame["correct"] = frame["correct"].map(lambda v: None if v is None else float(v))
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
        """Where checkpoint ``n``'s benchmark items and attempts are journaled while it is computed."""
        return self.folder / "checkpoints" / f"{n:06d}.partial"

    def present(self) -> list[int]:
        """Checkpoints whose folder exists, verified or not (``.tmp``, ``.partial``, set-aside ones do not count)."""
        root = self.folder / "checkpoints"
        return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit()) if root.exists() else []

    def problems(self, n: int, files: tuple[str, ...] | None = None) -> list[str]:
        """What is wrong with checkpoint ``n``'s files (empty: verified), each naming the file.

        Args:
            n: the checkpoint.
            files: check only these file names (and meta.json); default every file.
        """
        folder = self.checkpoint_dir(n)
        meta = folder / "meta.json"
        if not meta.is_file():
            return [f"{meta} is missing"]
        manifest = folder / CHECKSUMS
        if not manifest.is_file():
            return self._legacy_problems(folder, files)
        try:
            expected = read_json(manifest, "")
        except ResultsFileError:
            return [f"{manifest} is unreadable"]
        found = []
        for name, digest in sorted(expected.items()):
            if files is not None and name not in files and name != "meta.json":
                continue
            path = folder / name
            if not path.is_file() and name in STATE_FILES:
                continue  # weight-free: resumed by replaying the edits (see has_state)
            if not path.is_file():
                found.append(f"{path} is missing")
            elif sha256_file(path) != digest:
                found.append(f"{path} does not match its SHA-256 in {CHECKSUMS}")
        return found

    @staticmethod
    def _legacy_problems(folder: Path, files: tuple[str, ...] | None) -> list[str]:
        # Written before checksums: every file that must be there is there and parses.
        found = []
        try:
            read_json(folder / "meta.json", "")
        except ResultsFileError as error:
            found.append(str(error).rstrip("; "))
        if not (folder / "scores.parquet").is_file():
            found.append(f"{folder / 'scores.parquet'} is missing")
        for path in sorted(folder.glob("*.parquet")):
            if files is not None and path.name not in files:
                continue
            try:
                pq.read_metadata(path)
            except (OSError, ValueError) as error:
                found.append(f"{path} is unreadable ({error})")
        return found

    def has_state(self, n: int) -> bool:
        """Whether checkpoint ``n`` holds every state file its checksums name (False: weight-free, replay)."""
        folder = self.checkpoint_dir(n)
        try:
            expected = read_json(folder / CHECKSUMS, "")
        except ResultsFileError:
            return True  # a legacy checkpoint: its files are whatever it has
        return all((folder / name).is_file() for name in expected if name in STATE_FILES)

    def verified(self) -> list[int]:
        """Checkpoints whose files all pass :meth:`problems`."""
        return [n for n in self.present() if not self.problems(n)]

    def set_aside(self, n: int, problems: list[str]) -> Path:
        """Rename a checkpoint that failed verification to ``<n>.corrupt-<time>`` (kept for inspection)."""
        folder = self.checkpoint_dir(n)
        target = folder.with_name(f"{folder.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(2)}")
        os.replace(folder, target)
        log.warning("checkpoint %s failed verification (%s); moved to %s and recomputed", folder,
                    "; ".join(problems), target.name)
        return target

    def write_manifest(self, config: dict[str, Any], manifest: dict[str, Any]) -> None:
        """``config.json`` (what defines the cell) and ``manifest.json`` (provenance, refreshed each start)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(self.folder / "config.json", config)
        write_json(self.folder / "manifest.json", {**manifest, "versions": _versions(), "git_commit": _git_commit(),
                                                   "updated": time.strftime("%Y-%m-%dT%H:%M:%S")})

    def read_reference(self) -> list:
        """The saved locality references; an unreadable file is set aside (to be recomputed) with a warning."""
        path = self.folder / "reference.json"
        if not path.exists():
            return []
        try:
            return read_json(path, "")
        except ResultsFileError as error:
            aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
            os.replace(path, aside)
            log.warning("%s; moved to %s, the unedited model's answers are computed again", error, aside.name)
            return []

    def write_reference(self, stored: list) -> None:
        write_json(self.folder / "reference.json", stored)

    def begin_attempt(self, n: int) -> list[dict[str, Any]]:
        """Record that this process starts computing checkpoint ``n``; returns the earlier attempts."""
        folder = self.partial_dir(n)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "attempts.jsonl"
        earlier = []
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    earlier.append({**json.loads(line), "finished": False})
                except ValueError:
                    continue  # a line cut off by a kill
        with path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(_attempt()) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return earlier

    def save_checkpoint(self, n: int, frames: dict[str, pd.DataFrame], meta: dict[str, Any],
                        weights: dict[str, torch.Tensor] | None, editor_state: dict[str, Any] | None) -> None:
        """Write checkpoint ``n`` atomically: frames, weights, editor state, meta.json, then the checksums."""

        def fill(tmp: Path) -> dict[str, Any]:
            tmp.mkdir(parents=True)
            for name, frame in frames.items():
                write_items(frame, tmp / f"{name}.parquet")
            if weights:
                save_file({k: v.contiguous().cpu() for k, v in weights.items()}, tmp / "state.safetensors")
            if editor_state is not None:
                torch.save(editor_state, tmp / "editor_state.pt")
            return meta

        self._write_checkpoint(n, fill)

    def copy_checkpoint(self, source: RunStore, n: int, meta: dict[str, Any]) -> None:
        """Checkpoint ``n`` of ``source`` (verified) as this cell's, with ``meta`` over its meta.json.

        Written like :meth:`save_checkpoint`: under a temporary name, checksummed, renamed.
        """
        origin = source.checkpoint_dir(n)

        def fill(tmp: Path) -> dict[str, Any]:
            shutil.copytree(origin, tmp, ignore=shutil.ignore_patterns(CHECKSUMS, "meta.json"))
            return {**read_json(origin / "meta.json", ""), **meta}

        self._write_checkpoint(n, fill)

    def _write_checkpoint(self, n: int, fill: Callable[[Path], dict[str, Any]]) -> None:
        """``fill(tmp)`` creates a temporary folder, writes the files and returns the meta; then
        meta.json and the checksums are written, and the folder is renamed into place."""
        final = self.checkpoint_dir(n)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            meta = fill(tmp)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
            digests = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
            (tmp / CHECKSUMS).write_text(json.dumps(digests, indent=2, sort_keys=True))
            if final.exists():  # a verified-bad folder is set aside before; anything here is a leftover
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(self.partial_dir(n), ignore_errors=True)

    def load_checkpoint(self, n: int, device: torch.device | str
                        ) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any] | None]:
        """Checkpoint ``n``'s meta, edited weights (possibly empty) and editor state (``None`` if not saved).

        Raises:
            ResultsFileError: a file of the checkpoint fails verification (named in the message).
        """
        problems = self.problems(n)
        if problems:
            raise ResultsFileError(f"checkpoint {self.checkpoint_dir(n)} failed verification: {'; '.join(problems)}; "
                                   "remove that folder and rerun to recompute it")
        folder = self.checkpoint_dir(n)
        meta = read_json(folder / "meta.json", "remove the checkpoint folder and rerun")
        state_file = folder / "state.safetensors"
        weights = load_file(state_file, device=str(device)) if state_file.exists() else {}
        editor_file = folder / "editor_state.pt"
        editor_state = torch.load(editor_file, map_location=device, weights_only=False) if editor_file.exists() else None
        return meta, weights, editor_state


def _attempt() -> dict[str, Any]:
    return {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": socket.gethostname(), "pid": os.getpid()}


def state_digest(weights: dict[str, torch.Tensor], editor_state: dict[str, Any]) -> str:
    """SHA-256 of what a model's answers depend on beyond the base model: edited weights, editor state."""
    digest = hashlib.sha256()
    digest_into(digest, {"weights": weights, "editor": editor_state})
    return digest.hexdigest()

"""One cell's sequential run: step through the edits, measure at checkpoints, resume.

The edit sets are nested prefixes, so one pass gives the whole curve. Edits are applied
``edit_batch_size`` at a time (1: one fact at a time, as in the paper). A rerun of the
same cell continues from its last finished checkpoint: the model and editor state
saved there are loaded, the edits since are replayed, and benchmark items already
evaluated for the interrupted checkpoint are read back from its journal when the
replayed model is bit-identical (a digest of the edited weights and editor state is
part of the journal key; otherwise they are evaluated again).

A checkpoint saved without its weights and editor state (a *weight-free* one: a results
root as committed to git, or copied without them) is resumed from by replaying its edits
from the last checkpoint that has its state (or from the unedited model), in the same
batches as the run that saved it, without measuring. The replayed state is checked
against the digest the checkpoint's meta.json records; the next checkpoint's meta
records the replay (``replayed``: from, to, and whether the digest matched), and a
mismatch or an unrecorded digest is also logged as a warning.

NaN or Inf in edited weights or in the model's outputs (benchmark items or held-out
text) is recorded as a collapse at that checkpoint (and every later one), not raised.

Health (:mod:`editkit.health`, on unless the study sets ``health: false``): the unedited
model's held-out perplexity is measured once at the start of every run (it is the
baseline of ``heldout_ppl_ratio``), then at every checkpoint, before the benchmarks,
the held-out perplexity and the statistics of every parameter changed so far against its
unedited value. When the study's ``health_alarm`` fires, the checkpoint is saved as a
collapse whose reason names the threshold, with its health rows; its benchmarks are not
run, and the cell stops there. The held-out score runs ``lm.model`` directly: a routing
editor that acts only inside the engine (SERAC) does not route it; hook-based ones
(GRACE) do act on it.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .benchmarks.engine import Engine
from .datasets import data_checksums, load_edit_requests
from .edit_metrics import edit_quality, locality_reference
from .editing import EditCollapseError, EditSession
from .editors import get_editor
from .health import (
    PerplexityResult,
    health_rows,
    heldout_texts,
    score_texts,
    weight_health,
)
from .locks import CellLock
from .modelinfo import describe_model
from .protocol import CheckpointProtocol, nonfinite_outputs
from .store import ResultsFileError, RunStore, read_json, state_digest
from .types import EditRequest

if TYPE_CHECKING:
    from .editing import Editor
    from .grid import Cell
    from .models import LoadedModel

__all__ = ["SequentialRun", "run_cell"]

log = logging.getLogger(__name__)


class SequentialRun:
    """The live state of one cell: the editor, its session, the position in the edit sequence."""

    def __init__(self, cell: Cell, lm: LoadedModel, editor: Editor, requests: Sequence[EditRequest],
                 store: RunStore, run_id: str, progress: bool = True) -> None:
        self.cell, self.lm, self.editor, self.requests = cell, lm, editor, list(requests)
        self.store, self.run_id, self.progress = store, run_id, progress
        self.session = EditSession(editor)
        self.engine = Engine(lm, batch_size=cell.study.batch_size, progress=False)
        self.protocol = CheckpointProtocol(tasks=tuple(cell.study.tasks), limits=cell.limits(),
                                           max_new_tokens=cell.study.max_new_tokens, seed=cell.seed,
                                           n_generation_examples=cell.study.n_generation_examples,
                                           lm_eval_include=cell.study.lm_eval_include)
        self.position = 0  # number of edits applied to the model right now
        self.collapse: str | None = None
        study = cell.study
        self.heldout = heldout_texts(study.heldout_source, study.heldout_chunks) if study.health else None
        self.alarm = study.alarm()
        self.baseline: PerplexityResult | None = None
        self.replayed: dict[str, Any] | None = None  # how the state was last reached by replay (for the next meta)

    def _check_unedited(self, what: str) -> None:
        if self.position or self.session.touched:
            raise RuntimeError(f"{what} must be computed on the unedited model")

    def reference(self) -> list:
        """Unedited locality answers for every request, computed before any edit is loaded.

        References saved before generation-based edit success existed lack the unedited
        continuations; those are added (on the unedited model) and saved.
        """
        stored = self.store.read_reference()
        changed = False
        if len(stored) < len(self.requests):
            self._check_unedited("locality references")
            stored = stored + locality_reference(self.engine, self.requests[len(stored):])
            changed = True
        stale = [i for i, per_request in enumerate(stored[:len(self.requests)])
                 if any(r is not None and "generation" not in r for r in per_request)]
        if stale:
            self._check_unedited("locality references")
            fresh = locality_reference(self.engine, [self.requests[i] for i in stale])
            for i, per_request in zip(stale, fresh):
                for old, new in zip(stored[i], per_request):
                    if old is not None and new is not None:
                        old["generation"] = new["generation"]
            changed = True
        if changed:
            self.store.write_reference(stored)
        return [[None if r is None else {**r, "greedy": tuple(r["greedy"])} for r in per_request]
                for per_request in stored[:len(self.requests)]]

    def _text_batch_size(self) -> int:
        """The held-out texts' batch size: the study's, or with ``auto`` the engine's for 256 tokens."""
        return self.engine.resolve_batch_size(256, 256)

    def measure_baseline(self) -> None:
        """The unedited model's held-out perplexity, the baseline of every checkpoint's ratio."""
        if self.heldout is None:
            return
        self._check_unedited("the held-out baseline")
        self.baseline = score_texts(self.lm, self.heldout, batch_size=self._text_batch_size())
        if not self.baseline.finite:
            raise RuntimeError(f"the unedited {self.lm.name} gives non-finite held-out log-likelihoods")

    def health(self) -> list[dict[str, Any]]:
        """:func:`~editkit.health.health_rows` of the model as it is now: held-out perplexity, changed weights."""
        if self.position == 0 and self.baseline is not None:
            heldout = self.baseline  # no edit yet: the unedited model's scores, measured once
        else:
            heldout = score_texts(self.lm, self.heldout, batch_size=self._text_batch_size())
        weights = weight_health(self.lm, self.session.pristine) if self.session.touched else []
        return health_rows(heldout, weights, self.baseline)

    def state_digest(self) -> str:
        return state_digest(self.session.edited_state(), self.editor.state_dict())

    def load(self, n: int) -> None:
        """Put the model (and editor) in the state saved at checkpoint ``n``."""
        self.session.restore()
        meta, weights, editor_state = self.store.load_checkpoint(n, self.lm.device)
        if meta["status"] == "collapsed":
            self.collapse = meta["reason"]
        if weights:
            self.session.load_edited_state(weights)
        if editor_state is not None:
            self.editor.load_state_dict(editor_state)
        self.position = n

    def resume_from(self, n: int, finished: Sequence[int], bar: tqdm) -> None:
        """Put the model in checkpoint ``n``'s state: load it, or for a weight-free ``n`` replay its edits.

        Args:
            n: a verified checkpoint (0: the unedited model, which need not be saved).
            finished: the verified checkpoints; the replay starts at the last one before ``n``
                that holds its state.
            bar: the edit progress bar, advanced by replayed edits.

        Raises:
            RuntimeError: an edit collapses while replaying, where the saved run went on.
        """
        if n == 0 or self.store.has_state(n):
            if n in finished:
                self.load(n)
            else:  # the unedited model, not saved by this cell
                self.session.restore()
                self.position, self.collapse = 0, None
            return
        base = max((c for c in finished if 0 < c < n and self.store.has_state(c)), default=0)
        self.resume_from(base, finished, bar)
        stops = sorted(c for c in self.cell.checkpoints() if base < c <= n)
        size = self.cell.edit_batch_size
        log.info("run %s: checkpoint %d was saved without its weights; replaying edits %d-%d", self.run_id, n,
                 base + 1, n)
        for stop in stops:  # the batches the saved run applied: they never cross a checkpoint
            while self.position < stop:
                batch = self.requests[self.position:min(self.position + size, stop)]
                try:
                    self.session.apply(batch)
                except EditCollapseError as error:
                    raise RuntimeError(f"run {self.run_id}: replaying edit {self.position + 1} towards weight-free "
                                       f"checkpoint {n} collapsed ({error}), but the saved run went on; remove "
                                       f"checkpoints after {base} under {self.store.folder} to recompute them"
                                       ) from error
                self.position += len(batch)
                bar.update(len(batch))
        # n was verified when the run started: its meta is all that is read again
        expected = read_json(self.store.checkpoint_dir(n) / "meta.json", "rerun to recompute it").get("state_digest")
        actual = self.state_digest()
        match = "unrecorded" if expected is None else ("match" if expected == actual else "mismatch")
        self.replayed = {"from": base, "to": n, "state_digest": match}
        if match != "match":
            log.warning("run %s: the state replayed to checkpoint %d %s; later checkpoints continue from the "
                        "replayed model (recorded in their meta.json as 'replayed')", self.run_id, n,
                        "has no recorded digest to check" if expected is None
                        else "differs from the saved run's (digest mismatch)")

    def advance(self, n: int, reference: list, bar: tqdm) -> pd.DataFrame:
        """Apply edits ``position+1 .. n`` in batches; returns their immediate-quality rows."""
        rows = []
        size = self.cell.edit_batch_size
        while self.position < n and self.collapse is None:
            start = self.position
            batch = self.requests[start:min(start + size, n)]
            started = time.perf_counter()
            try:
                handle = self.session.apply(batch)
            except EditCollapseError as error:
                self.collapse = f"edits {start + 1}-{start + len(batch)} ({batch[0].case_id!r}...): {error}"
                log.warning("run %s collapsed: %s", self.run_id, self.collapse)
                break
            seconds = (time.perf_counter() - started) / len(batch)
            quality = edit_quality(self.engine, batch, reference[start:start + len(batch)])
            infos = handle.info if len(handle.info) == len(batch) else [{} for _ in batch]
            for offset, (record, info) in enumerate(zip(quality.to_dict("records"), infos)):
                losses = info.get("losses") if isinstance(info, dict) else None
                rows.append({"edit": start + offset + 1, **record, "edit_seconds": seconds,
                             "final_loss": float(losses[-1]) if losses else np.nan})
            self.position += len(batch)
            bar.update(len(batch))
        return pd.DataFrame(rows)

    def checkpoint(self, n: int, reference: list, bar: tqdm) -> dict[str, Any]:
        """Reach ``n`` edits, measure, save checkpoint ``n``; returns its meta."""
        earlier = self.store.begin_attempt(n)
        started = time.strftime("%Y-%m-%dT%H:%M:%S")
        edit_started = time.perf_counter()
        latest = self.advance(n, reference, bar)
        edit_seconds = time.perf_counter() - edit_started
        eval_started = time.perf_counter()
        digest = None
        frames: dict[str, pd.DataFrame] = {}
        health = None
        if self.collapse is None and self.heldout is not None:
            rows = self.health()  # checked as rows: in a frame the summary rows' parameter would be NaN
            health = pd.DataFrame(rows, columns=["metric", "value", "parameter", "ci_low", "ci_high"])
            nonfinite = any(r["metric"] == "heldout_nonfinite" and r["value"] == 1.0 for r in rows)
            reason = self.alarm.check(rows) if self.alarm is not None else None
            if nonfinite:
                self.collapse = f"non-finite model outputs on held-out text at {n} edits"
            elif reason:
                self.collapse = f"health alarm at {n} edits: {reason}"
            if self.collapse:
                log.warning("run %s: %s", self.run_id, self.collapse)
        if self.collapse is None:
            # The key ties the item journal to this exact model state: a replay that differs starts over.
            digest = self.state_digest()
            key = f"{self.lm.name} after {n} edits of {self.run_id}, state {digest}"
            frames = self.protocol.measure(self.engine, self.requests[:n], reference, latest,
                                           self.protocol.probe_prompts(self.requests), progress=self.progress,
                                           journal=self.store.partial_dir(n), journal_key=key)
            if nonfinite_outputs(frames["items"]):
                self.collapse = f"non-finite model outputs at {n} edits"
                log.warning("run %s: %s", self.run_id, self.collapse)
        if self.collapse is not None:
            frames = {"scores": self.protocol.collapsed_scores()}
        if health is not None:  # also at the checkpoint that raised the alarm: it shows why
            frames["health"] = health
        frames["edits"] = latest
        eval_seconds = time.perf_counter() - eval_started
        # Every attempt at this checkpoint, also those a kill cut short (their timings are unknown).
        attempts = [*earlier, {"started": started, "host": socket.gethostname(), "pid": os.getpid(),
                               "finished": True, "edit_seconds": edit_seconds, "eval_seconds": eval_seconds}]
        meta = {"n_edits": n, "status": "ok" if self.collapse is None else "collapsed",
                "reason": self.collapse or "", "edit_seconds": edit_seconds, "eval_seconds": eval_seconds,
                "attempts": attempts, "run_id": self.run_id, **self.cell.axes()}
        keep_state = meta["status"] == "ok" and n > 0
        if keep_state:  # what a replay of a weight-free copy of this checkpoint is checked against
            meta["state_digest"] = digest
        if self.replayed is not None:
            meta["replayed"], self.replayed = self.replayed, None
        self.store.save_checkpoint(n, frames, meta,
                                   weights=self.session.edited_state() if keep_state and self.session.touched else None,
                                   editor_state=self.editor.state_dict() if keep_state else None)
        return meta


def run_cell(cell: Cell, lm: LoadedModel, results_dir: str | Path, *, progress: bool = True,
             on_checkpoint: Callable[[int, str], None] | None = None, wait: float | None = None) -> str:
    """Run (or resume) one cell on the loaded model ``lm``; returns its run id.

    Args:
        cell: the grid point (model, method, dataset, seed, batch size) and its study.
        lm: the cell's model, loaded; the cell's ``model`` names it in the results.
        results_dir: the results root; the cell's folder is ``<results_dir>/<run id>``.
        progress: progress bars over edits and benchmark items.
        on_checkpoint: called as ``on_checkpoint(n_edits, run_id)`` after each checkpoint is saved.
        wait: seconds to wait for another process that holds the cell (None: do not wait).

    Saved checkpoints are verified first; one that fails is set aside (named in a
    warning) and computed again from the last verified one. The model is returned to
    its unedited weights before this returns, also on error.

    Raises:
        CellLockedError: another live process works on this cell.
    """
    study = cell.study
    requests = load_edit_requests(cell.dataset, cell.split(), study.n_edits,
                                  shuffle_seed=cell.seed if study.shuffle_edits else study.shuffle_seed,
                                  on_invalid=study.invalid_records) if study.n_edits else []
    if len(requests) < study.n_edits:
        raise ValueError(f"{cell.dataset}/{cell.split()} has only {len(requests)} usable records")
    editor = get_editor(cell.method, lm, **cell.editor_overrides)
    run_id = cell.run_id(editor.params.digest())
    store = RunStore(Path(results_dir) / run_id)
    info = describe_model(cell.model, cell.declared_info, lm)
    with CellLock(store.folder, wait=wait):  # one writer per cell
        store.write_manifest(
            {**study.to_dict(), **cell.axes(), "method": cell.method, "editor_params": editor.params.to_dict(),
             "model_info": info.to_dict(), "cell": cell.index},
            {"run_id": run_id, "study_digest": study.digest(), "editor": cell.method,
             "editor_params_digest": editor.params.digest(), "model": lm.name, "model_source": lm.source,
             "model_info": info.to_dict(), "axes": cell.axes(), "device": str(lm.device),
             "data_checksums": data_checksums(cell.dataset, cell.split()), "unedited_key": cell.unedited_key(),
             "case_ids": [request.case_id for request in requests]})
        _clear_leftovers(store)
        run = SequentialRun(cell, lm, editor, requests, store, run_id, progress)
        _run_checkpoints(run, on_checkpoint)
    return run_id


def _clear_leftovers(store: RunStore) -> None:
    """Remove half-written checkpoint folders of dead processes (the cell lock is held, so no one writes)."""
    for tmp in (store.folder / "checkpoints").glob("*.tmp*"):
        log.debug("removing %s, left by an interrupted write", tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def _adopt_unedited(run: SequentialRun) -> bool:
    """Copy checkpoint 0 from a cell of the same root with the same unedited key; whether one was found.

    Checkpoint 0 measures the unedited model, so cells that differ only in method (or
    edit batch size) share it: the first cell computes it, the others copy its verified
    files (the copy's meta names ``copied_from``). This holds for every editor, routing
    ones included: at 0 edits none has changed anything.
    """
    key = run.cell.unedited_key()
    for folder in sorted(run.store.folder.parent.iterdir()):
        if folder == run.store.folder or not (folder / "manifest.json").is_file():
            continue
        try:
            manifest = read_json(folder / "manifest.json", "")
        except ResultsFileError:
            continue
        source = RunStore(folder)
        if manifest.get("unedited_key") != key or 0 not in source.present() or source.problems(0):
            continue
        meta = {"run_id": run.run_id, **run.cell.axes(), "copied_from": folder.name, "eval_seconds": 0.0,
                "attempts": [{"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": socket.gethostname(),
                              "pid": os.getpid(), "finished": True, "copied_from": folder.name}]}
        run.store.copy_checkpoint(source, 0, meta)
        log.info("run %s: checkpoint 0 (the unedited model) copied from %s", run.run_id, folder.name)
        return True
    return False


def _run_checkpoints(run: SequentialRun, on_checkpoint: Callable[[int, str], None] | None) -> None:
    """Verify what is saved, then compute every missing checkpoint of ``run``'s cell in order."""
    cell, store = run.cell, run.store
    finished = []
    for n in store.present():
        problems = store.problems(n)
        if problems:  # never resumed from, never silently dropped: set aside, named, and recomputed
            store.set_aside(n, problems)
        else:
            finished.append(n)
    if 0 in cell.checkpoints() and 0 not in finished and _adopt_unedited(run):
        finished.append(0)
        if on_checkpoint is not None:
            on_checkpoint(0, run.run_id)
    todo = [n for n in cell.checkpoints() if n not in finished]
    # The unedited continuations are only read once an edit is measured.
    reference = run.reference() if any(n > 0 for n in todo) else []
    if todo:
        run.measure_baseline()
    bar = tqdm(total=cell.study.n_edits, desc=f"{cell.model} · {cell.method} edits", disable=not run.progress,
               unit="edit")
    try:
        for n in todo:
            start_from = max([c for c in finished if c <= n], default=0)
            if run.position > n or run.position < start_from:  # the live model is not usable for n
                run.resume_from(start_from, finished, bar)
            bar.n = run.position
            bar.refresh()
            run.checkpoint(n, reference, bar)
            finished.append(n)
            if on_checkpoint is not None:
                on_checkpoint(n, run.run_id)
    finally:
        bar.close()
        run.session.restore()  # the loaded model is shared by the next cell

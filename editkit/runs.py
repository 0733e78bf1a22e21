"""Sequential editing with evaluation at nested checkpoints, saved and resumable.

One *run* is one (model, method, editor params, edit data, evaluation settings).
Its folder ``<results_dir>/<method>-<digest>/`` holds::

    config.json, manifest.json        what was run (digests, versions, git commit, data checksums)
    reference.json                    the unedited model's locality answers (computed once)
    checkpoints/<n:06d>/              one folder per finished checkpoint, written atomically:
        meta.json                     status ("ok" | "collapsed"), reason, timings
        scores.parquet                benchmark aggregates with 95% bootstrap CIs
        items.parquet                 per-item benchmark rows (prompts, outputs, correctness)
        edit_quality.parquet          "latest" (each edit right after it was made, for the
                                      edits since the previous checkpoint) and "retention"
                                      (every edit so far, on the current model)
        edits.parquet                 per-edit immediate quality, timings and losses
        generations.parquet           greedy continuations of fixed probe prompts
        state.safetensors             every parameter the run has changed, as of n edits
        editor_state.pt               editor state beyond weights (templates, caches)
    checkpoints/<n:06d>.partial/      while checkpoint n is evaluated: one journal per task of
                                      the benchmark items finished so far (removed once saved)

The edit sets are nested prefixes, so one pass gives the whole curve, and a rerun
of the same configuration continues from the last finished checkpoint: a
checkpoint folder appears only complete (written to ``.tmp`` then renamed), so a
killed process loses at most the checkpoint in progress: its edits are replayed
from the last finished checkpoint, and its benchmark items already evaluated are
read back from ``<n>.partial/`` if the replayed model is the same (a digest of the
edited weights and the editor's state must match; otherwise they are evaluated
again). The number of edits and the checkpoint list are not part of the run's
identity: asking for more edits later extends the same run.

NaN or Inf in edited weights or in the model's outputs is recorded as a collapse
at that checkpoint (and every later one), not raised.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .config import Params
from .editing import EditCollapseError, EditSession
from .resources import atomic_write_text

if TYPE_CHECKING:
    from .models import LoadedModel

__all__ = ["StudyConfig", "StudyResult", "run_study", "load_study", "DEFAULT_CHECKPOINTS", "run_id_for", "write_items"]

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINTS = (0, 1, 5, 10, 20, 50, 100, 200, 500, 1000)
FRAMES = ("scores", "edit_quality", "generations", "checkpoints")
PROBE_MAX_TOKENS = 24


@dataclass(frozen=True)
class StudyConfig(Params):
    """Everything a sequential-editing study needs; strict like every :class:`Params`."""

    model: str = "smollm2-135m-instruct"
    methods: tuple[str, ...] = ("rome",)
    editor_overrides: Any = None
    dataset: str = "counterfact"
    split: str = "edit"
    n_edits: int = 10
    checkpoints: tuple[int, ...] = ()
    tasks: tuple[str, ...] = ("mmlu_cloze", "mmlu", "gsm8k")
    limit: int | None = 57
    task_limits: Any = None
    max_new_tokens: int = 256
    shuffle_seed: int | None = None
    seed: int = 0
    batch_size: int = 8
    device: str = "cpu"
    dtype: str = "float32"
    n_generation_examples: int = 3
    results_dir: str = "results/01_number_of_edits/default"

    def __post_init__(self) -> None:
        from .benchmarks import get_task
        from .editors import editor_class

        if self.n_edits < 0:
            raise ValueError(f"n_edits must be >= 0, got {self.n_edits}")
        if not self.methods:
            raise ValueError("methods is empty")
        for method in self.methods:
            editor_class(method)
        for task in self.tasks:
            get_task(task)
        if self.dataset not in ("counterfact", "zsre"):
            raise ValueError(f"dataset must be 'counterfact' or 'zsre', got {self.dataset!r}")
        bad = [c for c in self.checkpoints if not 0 <= c <= self.n_edits]
        if bad:
            raise ValueError(f"checkpoints {bad} fall outside 0..n_edits={self.n_edits}")
        for name in ("editor_overrides", "task_limits"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"{name} must be a mapping or None, got {type(value).__name__}")
        for method in self.editor_overrides or {}:
            if method not in self.methods:
                raise ValueError(f"editor_overrides names {method!r}, which is not in methods {self.methods}")
        for task in self.task_limits or {}:
            if task not in self.tasks:
                raise ValueError(f"task_limits names {task!r}, which is not in tasks {self.tasks}")
        if self.limit is not None and self.limit < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("limit, batch_size and max_new_tokens must be positive")

    def checkpoint_list(self) -> list[int]:
        """Sorted checkpoints; the defaults up to ``n_edits`` (always ending at ``n_edits``)."""
        points = set(self.checkpoints) if self.checkpoints else {c for c in DEFAULT_CHECKPOINTS if c <= self.n_edits}
        return sorted(points | {self.n_edits})

    def task_limit(self, task: str) -> int | None:
        return (self.task_limits or {}).get(task, self.limit)


@dataclass
class StudyResult:
    """Tidy frames of every run under ``results_dir`` (see the module docstring)."""

    results_dir: Path
    scores: pd.DataFrame
    edit_quality: pd.DataFrame
    generations: pd.DataFrame
    checkpoints: pd.DataFrame


# -- identity and provenance --------------------------------------------------------

def _evaluation_identity(config: StudyConfig) -> dict[str, Any]:
    fields = ("model", "dataset", "split", "shuffle_seed", "tasks", "max_new_tokens", "seed", "dtype",
              "n_generation_examples")
    identity = {name: getattr(config, name) for name in fields}
    identity["limits"] = {task: config.task_limit(task) for task in config.tasks}
    return identity


def run_id_for(config: StudyConfig, method: str, editor_params: Params) -> str:
    """``<method>-<digest>``: the digest covers everything but n_edits and checkpoints."""
    import hashlib

    payload = json.dumps([method, editor_params.digest(), _evaluation_identity(config)], sort_keys=True, default=list)
    return f"{method}-{hashlib.sha256(payload.encode()).hexdigest()[:10]}"


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


def _write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=str))


# -- one run ------------------------------------------------------------------------

class _Run:
    """The state of one method's sequential run (kept small; all I/O lives here)."""

    def __init__(self, config: StudyConfig, method: str, lm: LoadedModel, requests: list, progress: bool) -> None:
        from .benchmarks import Engine
        from .editors import get_editor

        self.config, self.method, self.lm, self.requests, self.progress = config, method, lm, requests, progress
        overrides = (config.editor_overrides or {}).get(method, {})
        self.editor = get_editor(method, lm, **overrides)
        self.session = EditSession(self.editor)
        self.engine = Engine(lm, batch_size=config.batch_size, progress=False)
        self.run_id = run_id_for(config, method, self.editor.params)
        self.folder = Path(config.results_dir) / self.run_id
        self.position = 0  # number of edits applied to the model right now
        self.collapse: str | None = None

    # paths
    def ckpt_dir(self, n: int) -> Path:
        return self.folder / "checkpoints" / f"{n:06d}"

    def finished(self) -> list[int]:
        root = self.folder / "checkpoints"
        return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit()) if root.exists() else []

    def write_manifest(self) -> None:
        from .datasets import data_checksums

        self.folder.mkdir(parents=True, exist_ok=True)
        _write_json(self.folder / "config.json", {**self.config.to_dict(), "method": self.method,
                                                   "editor_params": self.editor.params.to_dict()})
        _write_json(self.folder / "manifest.json", {
            "run_id": self.run_id,
            "study_digest": self.config.digest(),
            "editor": self.method,
            "editor_params_digest": self.editor.params.digest(),
            "model": self.lm.name,
            "model_source": self.lm.source,
            "device": str(self.lm.device),
            "versions": _versions(),
            "git_commit": _git_commit(),
            "data_checksums": data_checksums(self.config.dataset, self.config.split),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        })

    def reference(self) -> list:
        """Unedited locality answers for every request, computed before any edit is loaded."""
        from .edit_metrics import locality_reference

        path = self.folder / "reference.json"
        stored = json.loads(path.read_text()) if path.exists() else []
        if len(stored) < len(self.requests):
            if self.position or self.session.touched:
                raise RuntimeError("locality references must be computed on the unedited model")
            stored = stored + locality_reference(self.engine, self.requests[len(stored):])
            _write_json(path, stored)
        return [[None if r is None else {"greedy": tuple(r["greedy"]), "prefers_answer": r["prefers_answer"]}
                 for r in per_request] for per_request in stored[:len(self.requests)]]

    def partial_dir(self, n: int) -> Path:
        """Where checkpoint ``n``'s benchmark items are journaled while it is evaluated."""
        return self.folder / "checkpoints" / f"{n:06d}.partial"

    # state
    def state_digest(self) -> str:
        """SHA-256 of what the model's answers depend on beyond the base model: edited weights, editor state."""
        import hashlib

        digest = hashlib.sha256()
        _digest_into(digest, {"weights": self.session.edited_state(), "editor": self.editor.state_dict()})
        return digest.hexdigest()

    def load_checkpoint_state(self, n: int) -> None:
        """Put the model (and editor) in the state saved at checkpoint ``n``."""
        self.session.restore()
        folder = self.ckpt_dir(n)
        meta = json.loads((folder / "meta.json").read_text())
        if meta["status"] == "collapsed":
            self.collapse = meta["reason"]
        state_file = folder / "state.safetensors"
        if state_file.exists():
            state = load_file(state_file, device=str(self.lm.device))
            self.session.load_edited_state(state)
        editor_state = folder / "editor_state.pt"
        if editor_state.exists():
            self.editor.load_state_dict(torch.load(editor_state, map_location=self.lm.device, weights_only=False))
        self.position = n

    def advance(self, n: int, reference: list, bar: tqdm) -> pd.DataFrame:
        """Apply edits ``position+1 .. n``; returns their immediate-quality rows."""
        from .edit_metrics import edit_quality

        rows = []
        while self.position < n and self.collapse is None:
            index = self.position
            request = self.requests[index]
            started = time.perf_counter()
            try:
                handle = self.session.apply(request)
            except EditCollapseError as error:
                self.collapse = f"edit {index + 1} ({request.case_id!r}): {error}"
                log.warning("run %s collapsed: %s", self.run_id, self.collapse)
                break
            seconds = time.perf_counter() - started
            quality = edit_quality(self.engine, [request], [reference[index]]).iloc[0].to_dict()
            info = handle.info[0] if handle.info else {}
            rows.append({"edit": index + 1, **quality, "edit_seconds": seconds,
                         "final_loss": float(info["losses"][-1]) if info.get("losses") else np.nan})
            self.position += 1
            bar.update(1)
        return pd.DataFrame(rows)

    def evaluate(self, n: int, latest: pd.DataFrame, reference: list) -> dict[str, pd.DataFrame]:
        from .benchmarks import aggregate, evaluate, get_task
        from .benchmarks.engine import GenerationRequest
        from .edit_metrics import edit_quality, summarize_quality

        items = []
        # Benchmark items are journaled, so a run stopped mid-evaluation resumes at the item it reached.
        # The key ties the journal to this exact model state: a replay that differs starts over.
        key = f"{self.lm.name} after {n} edits of {self.run_id}, state {self.state_digest()}"
        for task in self.config.tasks:
            spec = get_task(task)
            if hasattr(spec, "max_new_tokens") and spec.max_new_tokens != self.config.max_new_tokens:
                spec = spec.with_options(max_new_tokens=self.config.max_new_tokens)
            items.append(evaluate(self.engine, [spec], limit=self.config.task_limit(task), progress=self.progress,
                                  journal=self.partial_dir(n), journal_key=key))
        items = pd.concat(items, ignore_index=True)
        scores = aggregate(items, seed=self.config.seed)
        quality = []
        if n > 0:
            retention = edit_quality(self.engine, self.requests[:n], reference[:n])
            for scope, frame in (("retention", retention), ("latest", latest)):
                if len(frame):
                    quality.append(summarize_quality(frame, seed=self.config.seed).assign(scope=scope))
        quality = pd.concat(quality, ignore_index=True) if quality else pd.DataFrame()
        probes = [r.prompt for r in self.requests[: self.config.n_generation_examples]]
        outputs = self.engine.generate_until([GenerationRequest(p, ("\n",), PROBE_MAX_TOKENS) for p in probes])
        generations = pd.DataFrame({"prompt": probes, "output": outputs})
        return {"items": items, "scores": scores, "edit_quality": quality, "generations": generations}

    def save_checkpoint(self, n: int, frames: dict[str, pd.DataFrame], meta: dict[str, Any]) -> None:
        final = self.ckpt_dir(n)
        tmp = final.with_name(final.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        for name, frame in frames.items():
            write_items(frame, tmp / f"{name}.parquet")
        if meta["status"] == "ok" and n > 0:
            if self.session.touched:
                save_file({k: v.contiguous().cpu() for k, v in self.session.edited_state().items()},
                          tmp / "state.safetensors")
            torch.save(self.editor.state_dict(), tmp / "editor_state.pt")
        _write_json(tmp / "meta.json", meta)
        os.replace(tmp, final)
        shutil.rmtree(self.partial_dir(n), ignore_errors=True)


def _digest_into(digest: Any, value: Any) -> None:
    """Feed a nested structure of tensors, mappings, sequences and scalars to a hashlib digest."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"tensor {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        digest.update(f"dict {len(value)}".encode())
        for key in sorted(value, key=repr):
            digest.update(repr(key).encode())
            _digest_into(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"seq {len(value)}".encode())
        for item in value:
            _digest_into(digest, item)
    else:
        digest.update(repr(value).encode())


def write_items(frame: pd.DataFrame, path: Path) -> None:
    """Write per-item rows to parquet (answers, indices or texts, are stored as text)."""
    frame = frame.copy()
    for column in ("target", "prediction", "prediction_norm", "prediction_flexible"):
        if column in frame:  # index for choice tasks, text for generation: store as text
            frame[column] = frame[column].map(lambda v: None if v is None else str(v))
    frame.to_parquet(path, index=False)


def _collapsed_scores(tasks: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame({"task": list(tasks), "metric": "acc", "value": np.nan, "ci_low": np.nan,
                         "ci_high": np.nan, "n": 0})


def _run_method(config: StudyConfig, method: str, lm: LoadedModel, requests: list, progress: bool,
                on_checkpoint: Callable[[int, str], None] | None) -> None:
    run = _Run(config, method, lm, requests, progress)
    run.write_manifest()
    reference = run.reference()
    finished = run.finished()
    todo = [n for n in config.checkpoint_list() if n not in finished]
    bar = tqdm(total=config.n_edits, desc=f"{method} edits", disable=not progress, unit="edit")
    try:
        for n in todo:
            start_from = max([c for c in finished if c <= n], default=0)
            if run.position > n or run.position < start_from:  # the live model is not usable for n
                run.load_checkpoint_state(start_from)
            bar.n = run.position
            bar.refresh()
            edit_started = time.perf_counter()
            latest = run.advance(n, reference, bar)
            edit_seconds = time.perf_counter() - edit_started
            eval_started = time.perf_counter()
            if run.collapse is None:
                frames = run.evaluate(n, latest, reference)
                finite = frames["items"]["finite"] if "finite" in frames["items"] else pd.Series([], dtype=object)
                if any(value is False or value is np.False_ for value in finite):  # None: not a scored item
                    run.collapse = f"non-finite model outputs at {n} edits"
                    log.warning("run %s: %s", run.run_id, run.collapse)
            if run.collapse is not None:
                frames = {"scores": _collapsed_scores(config.tasks), "edits": latest}
            else:
                frames["edits"] = latest
            meta = {"n_edits": n, "status": "ok" if run.collapse is None else "collapsed",
                    "reason": run.collapse or "", "edit_seconds": edit_seconds,
                    "eval_seconds": time.perf_counter() - eval_started, "run_id": run.run_id,
                    "method": method, "model": lm.name}
            run.save_checkpoint(n, frames, meta)
            finished.append(n)
            if on_checkpoint is not None:
                on_checkpoint(n, run.run_id)
    finally:
        bar.close()
        run.session.restore()  # the loaded model is shared by the next method


def run_study(config: StudyConfig, progress: bool = True, *, lm: LoadedModel | None = None,
              on_checkpoint: Callable[[int, str], None] | None = None) -> StudyResult:
    """Run (or resume) every method of ``config`` and return all saved results.

    Args:
        config: the study; ``results_dir`` is where runs are saved and resumed from.
        progress: progress bars over edits.
        lm: an already loaded model to use instead of loading ``config.model``.
        on_checkpoint: called as ``on_checkpoint(n_edits, run_id)`` after each
            checkpoint is saved.

    The model is returned to its unedited weights before this returns.
    """
    from .datasets import load_counterfact, load_zsre
    from .models import load_model

    if lm is None:
        lm = load_model(config.model, dtype=config.dtype, device=config.device)
    loader = load_counterfact if config.dataset == "counterfact" else load_zsre
    requests = loader(config.split, config.n_edits, shuffle_seed=config.shuffle_seed) if config.n_edits else []
    if len(requests) < config.n_edits:
        raise ValueError(f"{config.dataset}/{config.split} has only {len(requests)} usable records")
    for method in config.methods:
        _run_method(config, method, lm, requests, progress, on_checkpoint)
    return load_study(config.results_dir)


def load_study(results_dir: str | os.PathLike[str]) -> StudyResult:
    """Read every run saved under ``results_dir`` into tidy frames."""
    root = Path(results_dir)
    collected: dict[str, list[pd.DataFrame]] = {name: [] for name in FRAMES}
    for meta_path in sorted(root.glob("*/checkpoints/[0-9]*/meta.json")):
        meta = json.loads(meta_path.read_text())
        folder = meta_path.parent
        keys = {"run_id": meta["run_id"], "model": meta["model"], "method": meta["method"],
                "n_edits": meta["n_edits"]}
        collected["checkpoints"].append(pd.DataFrame([{**keys, **{k: meta[k] for k in
                                                                  ("status", "reason", "edit_seconds",
                                                                   "eval_seconds")}}]))
        for name in ("scores", "edit_quality", "generations"):
            path = folder / f"{name}.parquet"
            if path.exists():
                frame = pd.read_parquet(path)
                if len(frame):
                    collected[name].append(frame.assign(**keys))
    frames = {}
    for name, parts in collected.items():
        frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(_EMPTY[name]))
        if name == "scores" and len(frame):
            status = pd.concat(collected["checkpoints"], ignore_index=True).set_index(["run_id", "n_edits"])["status"]
            frame["status"] = [status.get((r, n), "ok") for r, n in zip(frame["run_id"], frame["n_edits"])]
        frames[name] = frame.sort_values(["run_id", "n_edits"], kind="stable").reset_index(drop=True) \
            if len(frame) else frame
    return StudyResult(results_dir=root, **frames)


_EMPTY = {
    "scores": ("run_id", "model", "method", "n_edits", "task", "metric", "value", "ci_low", "ci_high", "n", "status"),
    "edit_quality": ("run_id", "model", "method", "n_edits", "scope", "metric", "convention", "value", "ci_low",
                     "ci_high", "n"),
    "generations": ("run_id", "model", "method", "n_edits", "prompt", "output"),
    "checkpoints": ("run_id", "model", "method", "n_edits", "status", "reason", "edit_seconds", "eval_seconds"),
}

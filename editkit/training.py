"""Training the learned parts of editors (MEND's hypernetwork, SERAC's scope classifier) once, and reusing them.

Trained editors declare ``needs_training = True`` and two class methods:

* ``artifact_key(lm, params) -> ArtifactKey``: what the trained component depends on
  (the method, the model it was trained for, the training data and its checksum, and
  the digest of every hyperparameter);
* ``trainable(lm, params, train, val) -> Trainable``: the component and its loss.

:func:`editkit.editors.trainer.train_editor` resolves the hyperparameters as
:func:`editkit.get_editor` does, trains with :func:`fit` (progress bar, a checkpoint every
``checkpoint_every`` steps, resume after an interruption) and saves the result with
:func:`save_artifact` under ``<cache root>/trained/<method>/<model>/<data>-<digest>/``.
The editor's constructor calls :func:`load_artifact`: a missing artifact raises
:class:`MissingArtifactError` whose message is the command that trains it
(:func:`train_command`); a corrupted file (checksum) or one saved for other settings
raises :class:`ArtifactError`. An artifact is never retrained silently: ``train_editor``
returns the existing one unless ``force=True``.

This module knows no editor (the editors that train import it); what needs the
editor registry lives in :mod:`editkit.editors.trainer`.

Command line::

    python -m editkit train mend --model smollm2-135m-instruct --data counterfact [--preset smoke|paper] [--set k=v]
"""

from __future__ import annotations

import abc
import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .config import Params, packaged_params
from .datasets import edit_dataset
from .paths import cache_root
from .resources import atomic_torch_save, sha256_file
from .types import EditRequest

if TYPE_CHECKING:
    from .models import LoadedModel

__all__ = [
    "ArtifactKey",
    "ArtifactError",
    "MissingArtifactError",
    "Trainable",
    "fit",
    "save_artifact",
    "load_artifact",
    "train_command",
    "training_data",
    "data_digest",
]

log = logging.getLogger(__name__)

WEIGHTS = "weights.safetensors"
META = "meta.json"
CHECKPOINT = "checkpoint.pt"


class MissingArtifactError(FileNotFoundError):
    """No trained component for this editor, model, data and settings (the message says how to train it)."""


class ArtifactError(ValueError):
    """A trained artifact is corrupted, or was saved for other settings than those asked for."""


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "--", text).strip("-") or "default"


@dataclass(frozen=True)
class ArtifactKey:
    """What a trained component depends on; two equal keys name the same artifact.

    Attributes:
        method: the editor's registry name.
        model: the model the component was trained for (MEND: the edited model;
            SERAC: its scope classifier's encoder).
        data: the training data, e.g. ``"counterfact"``.
        data_digest: short SHA-256 over the checksums of the data's training files.
        digest: :meth:`Params.digest` of the editor's hyperparameters.
        command: the shell command that trains it (shown when it is missing).
    """

    method: str
    model: str
    data: str
    data_digest: str
    digest: str
    command: str = ""

    def directory(self, root: str | os.PathLike[str] | None = None) -> Path:
        return (cache_root(root) / "trained" / _slug(self.method) / _slug(self.model)
                / f"{_slug(self.data)}-{self.data_digest}-{self.digest}")

    def meta(self) -> dict[str, str]:
        return {"method": self.method, "model": self.model, "data": self.data,
                "data_digest": self.data_digest, "digest": self.digest}


class Trainable(abc.ABC):
    """A component to train: ``module`` holds every trained parameter (and buffer).

    Subclasses set ``module``, ``steps`` (optimiser steps in all) and implement
    :meth:`sample` (one training batch) and :meth:`loss`. :meth:`param_groups`
    gives the optimiser's parameter groups with their learning rates.
    """

    module: torch.nn.Module
    steps: int
    grad_clip: float | None = None

    @abc.abstractmethod
    def param_groups(self) -> list[dict[str, Any]]:
        """Adam parameter groups, each with its ``lr``."""

    @abc.abstractmethod
    def sample(self, rng: random.Random) -> Any:
        """One training batch, drawn with ``rng`` (its state is checkpointed)."""

    @abc.abstractmethod
    def loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """The scalar loss to minimise on ``batch`` and named values to log."""

    def validate(self) -> dict[str, float]:
        """Validation metrics, computed at each checkpoint (none by default)."""
        return {}


def fit(trainable: Trainable, directory: str | os.PathLike[str], *, seed: int = 0, checkpoint_every: int = 50,
        fingerprint: dict[str, Any] | None = None, progress: bool = True) -> list[dict[str, float]]:
    """Train ``trainable.module`` with Adam for ``trainable.steps`` steps, checkpointing into ``directory``.

    A checkpoint (module, optimiser, step, random states and the log so far) is
    written every ``checkpoint_every`` steps and at the end. If ``directory``
    already holds one, training resumes from it, so an interrupted run continues
    where it stopped and reaches the same weights as an uninterrupted one.

    Args:
        fingerprint: identifies the run (e.g. :meth:`ArtifactKey.meta`); a
            checkpoint written for another fingerprint is an :class:`ArtifactError`.

    Returns:
        One dict of logged values per step.

    Raises:
        FloatingPointError: the loss became NaN or infinite (the last checkpoint is kept).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT
    fingerprint = dict(fingerprint or {})
    optimizer = torch.optim.Adam(trainable.param_groups())
    rng = random.Random(seed)
    history: list[dict[str, float]] = []
    start = 0
    if path.exists():
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("fingerprint") != fingerprint:
            raise ArtifactError(f"{path} is a checkpoint of another training run ({state.get('fingerprint')}); "
                                f"delete it to start again")
        trainable.module.load_state_dict(state["module"])
        optimizer.load_state_dict(state["optimizer"])
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        history, start = state["history"], state["step"]
        log.info("resuming training from step %d of %d (%s)", start, trainable.steps, path)
    else:
        torch.manual_seed(seed)

    def checkpoint(step: int) -> None:
        atomic_torch_save({"module": trainable.module.state_dict(), "optimizer": optimizer.state_dict(),
                            "rng": rng.getstate(), "torch_rng": torch.get_rng_state(), "history": history,
                            "step": step, "fingerprint": fingerprint}, path)

    trainable.module.train()
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    with tqdm(total=trainable.steps, initial=start, disable=not progress, desc="train") as bar:
        for step in range(start, trainable.steps):
            loss, logged = trainable.loss(trainable.sample(rng))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss is {loss.item()} at step {step}; the checkpoint of step "
                                         f"{step - step % checkpoint_every} is kept in {path}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if trainable.grad_clip is not None:
                logged["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(parameters, trainable.grad_clip))
            optimizer.step()
            history.append({"step": step + 1, "loss": loss.item(), **logged})
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            done = step + 1
            if done % checkpoint_every == 0 or done == trainable.steps:
                trainable.module.eval()
                with torch.no_grad():
                    history[-1].update({f"val_{k}": v for k, v in trainable.validate().items()})
                trainable.module.train()
                checkpoint(done)
    trainable.module.eval()
    return history


def save_artifact(key: ArtifactKey, module: torch.nn.Module, info: dict[str, Any] | None = None,
                  root: str | os.PathLike[str] | None = None) -> Path:
    """Write ``module``'s state (safetensors) and a manifest (key, SHA-256, ``info``) atomically."""
    final = key.directory(root)
    tmp = final.with_name(final.name + ".saving")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    # Cloned: safetensors refuses tensors that share memory (a language model's tied embeddings).
    save_file({k: v.detach().cpu().clone() for k, v in module.state_dict().items()}, tmp / WEIGHTS)
    meta = {**key.meta(), "sha256": sha256_file(tmp / WEIGHTS), **(info or {})}
    (tmp / META).write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def load_artifact(key: ArtifactKey, module: torch.nn.Module, root: str | os.PathLike[str] | None = None
                  ) -> dict[str, Any]:
    """Load the trained state for ``key`` into ``module`` and return its manifest.

    Raises:
        MissingArtifactError: nothing saved for ``key`` (the message holds the train command).
        ArtifactError: the weights' checksum differs from the manifest's, the manifest
            names other settings, or the saved tensors do not fit ``module``.
    """
    directory = key.directory(root)
    if not (directory / META).exists() or not (directory / WEIGHTS).exists():
        raise MissingArtifactError(
            f"no trained {key.method} component for model {key.model!r}, data {key.data!r} and these "
            f"hyperparameters (digest {key.digest}) under {directory}. Train it once with:\n    {key.command}"
        )
    try:
        meta = json.loads((directory / META).read_text())
    except json.JSONDecodeError as error:
        raise ArtifactError(f"{directory / META} is not valid JSON ({error}); retrain with: {key.command}") from None
    mismatched = {k: (meta.get(k), v) for k, v in key.meta().items() if meta.get(k) != v}
    if mismatched:
        raise ArtifactError(f"{directory} was saved for other settings (saved, asked): {mismatched}")
    if sha256_file(directory / WEIGHTS) != meta.get("sha256"):
        raise ArtifactError(f"{directory / WEIGHTS} is corrupted: its SHA-256 differs from the manifest's. "
                            f"Delete the folder and retrain with: {key.command}")
    try:
        module.load_state_dict(load_file(directory / WEIGHTS, device="cpu"))
    except RuntimeError as error:
        raise ArtifactError(f"{directory / WEIGHTS} does not fit this {key.method} component: {error}") from None
    return meta


def training_data(data: str, n_train: int | None = None, n_val: int | None = None
                  ) -> tuple[list[EditRequest], list[EditRequest], str]:
    """The ``train`` and ``val`` edit requests of a packaged edit dataset, and a digest of their files.

    What ``train`` and ``val`` are is the dataset's (see :class:`~editkit.datasets.EditDataset`):
    ``counterfact``: EasyEdit's train (10,000) and val (1,919) splits. ``zsre``: the packaged
    1,000-record train subset, split 900 / 100 (records with an empty target skipped).

    Raises:
        ValueError: ``data`` is not a registered edit dataset.
    """
    train, val = edit_dataset(data).train_val(n_train, n_val)
    return train, val, data_digest(data)


def data_digest(data: str) -> str:
    """The digest :func:`training_data` gives for ``data``, without loading the records."""
    sums = edit_dataset(data).training_checksums()
    return hashlib.sha256(json.dumps(sums, sort_keys=True).encode()).hexdigest()[:12]


def train_command(name: str, lm: LoadedModel, params: Params) -> str:
    """The command line that trains editor ``name`` for ``lm`` with ``params``.

    It names every value that differs from the packaged defaults for ``lm``
    (:func:`~editkit.config.packaged_params` of ``params``' class), so running it
    gives an artifact the same ``params`` will find.
    """
    defaults = packaged_params(type(params), name, lm).to_dict()
    parts = ["python -m editkit train", name, "--model", lm.name]
    for field, value in params.to_dict().items():
        if value != defaults[field]:
            text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
            parts += ["--set", f"{field}={text}"]
    return " ".join(parts)

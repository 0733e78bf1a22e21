"""Training an editor's learned component by registry name (MEND's hypernetwork, SERAC's classifier).

:func:`train_editor` is the half of :mod:`editkit.training` that needs the editor
registry: it resolves the hyperparameters as :func:`editkit.get_editor` does and
then uses the machinery of :mod:`editkit.training` (data, :func:`~editkit.training.fit`,
artifacts). It sits above both, so :mod:`editkit.training` imports no editor and the
editors that train (:mod:`.mend`, :mod:`.serac`) import it without a loop.
``python -m editkit train`` calls it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..training import META, ArtifactError, fit, save_artifact, training_data
from . import editor_class, resolve_params

if TYPE_CHECKING:
    from ..models import LoadedModel

__all__ = ["train_editor"]

log = logging.getLogger(__name__)


def train_editor(name: str, lm: LoadedModel, *, preset: str | None = None, config_file: str | None = None,
                 force: bool = False, progress: bool = True, root: str | os.PathLike[str] | None = None,
                 **overrides: Any) -> Path:
    """Train editor ``name``'s component for ``lm`` (or find it already trained) and return its folder.

    The hyperparameters are resolved as :func:`editkit.get_editor` resolves them
    (``preset`` picks a named set from ``editkit/configs/<name>.yaml``, e.g.
    ``smoke`` or ``paper``), so the editor built with the same arguments finds the
    artifact. An existing artifact is returned as it is unless ``force``.

    Raises:
        ValueError: editor ``name`` has nothing to train.
        ArtifactError: the training files changed while training.
    """
    cls = editor_class(name)
    if not getattr(cls, "needs_training", False):
        raise ValueError(f"editor {name!r} has nothing to train")
    params = resolve_params(name, lm, config_file, preset=preset, **overrides)
    key = cls.artifact_key(lm, params)
    directory = key.directory(root)
    if (directory / META).exists() and not force:
        log.info("%s is already trained for these settings: %s (pass force=True to retrain)", name, directory)
        return directory
    train, val, digest = training_data(params.train_data, params.train_records or None,
                                       params.val_records or None)
    if digest != key.data_digest:
        raise ArtifactError(f"the {params.train_data} files changed while training ({digest} != {key.data_digest})")
    trainable = cls.trainable(lm, params, train, val)
    work = directory.with_name(directory.name + ".partial")
    start = time.perf_counter()
    history = fit(trainable, work, seed=params.seed, checkpoint_every=params.checkpoint_every,
                  fingerprint=key.meta(), progress=progress)
    seconds = time.perf_counter() - start
    info = {"params": params.to_dict(), "steps": trainable.steps, "train_seconds": round(seconds, 1),
            "final": history[-1] if history else {}, "n_train": len(train), "n_val": len(val)}
    final = save_artifact(key, trainable.module, info, root)
    (final / "history.json").write_text(json.dumps(history))
    shutil.rmtree(work, ignore_errors=True)
    log.info("trained %s in %.0f s (%d steps): %s", name, seconds, trainable.steps, final)
    return final


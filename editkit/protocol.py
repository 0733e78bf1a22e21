"""The checkpoint protocol: what is measured on the model as it stands after ``n`` edits.

:meth:`CheckpointProtocol.measure` is a function from the current model (and whatever
editor state is installed in it) to the frames of one checkpoint:

* ``items`` and ``scores``: every benchmark task, one row per item, then aggregates with
  95% bootstrap intervals; ``lm_eval:<task>`` names run through lm-evaluation-harness
  (:mod:`editkit.lm_eval_tasks`);
* ``edit_quality``: reliability, generalisation and locality of the edits of the last
  steps (``latest``, computed as each step finished) and of every edit so far
  (``retention``, on this model);
* ``generations``: greedy continuations of a few fixed probe prompts.

It reads no files and writes none except the optional item journal, so the same
protocol serves sequential runs, one-off evaluations and tests.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .benchmarks import aggregate, evaluate, get_task
from .benchmarks.engine import Engine, GenerationRequest
from .edit_metrics import edit_quality, summarize_quality
from .lm_eval_tasks import evaluate_task, is_lm_eval_task
from .types import EditRequest

__all__ = ["CheckpointProtocol", "PROBE_MAX_TOKENS"]

PROBE_MAX_TOKENS = 24


@dataclass(frozen=True)
class CheckpointProtocol:
    """How one checkpoint is measured.

    Attributes:
        tasks: benchmark task names.
        limits: items per task (``None``: the whole task), by task name.
        max_new_tokens: generation budget of generative tasks.
        seed: seed of the bootstrap intervals.
        n_generation_examples: probe prompts (the first edit prompts) whose greedy
            continuations are saved.
        lm_eval_include: a folder of lm-eval task YAMLs for ``lm_eval:<task>`` names.
    """

    tasks: tuple[str, ...]
    limits: tuple[tuple[str, int | None], ...]
    max_new_tokens: int
    seed: int = 0
    n_generation_examples: int = 3
    lm_eval_include: str | None = None

    def limit(self, task: str) -> int | None:
        return dict(self.limits).get(task)

    def measure(self, engine: Engine, requests: Sequence[EditRequest], reference: Sequence[Any],
                latest: pd.DataFrame, probes: Sequence[str], *, progress: bool = False, journal: str | os.PathLike[str] | None = None,
                journal_key: str = "") -> dict[str, pd.DataFrame]:
        """The frames of one checkpoint on the model behind ``engine`` as it is now.

        Args:
            engine: the evaluation engine over the (edited) model.
            requests: every edit applied so far, in order (empty at 0 edits).
            reference: the unedited model's locality answers, one per request.
            latest: per-request quality of the edits since the previous checkpoint,
                each measured right after its step.
            probes: prompts whose greedy continuations are saved (the same at every
                checkpoint: :meth:`probe_prompts` of the whole edit sequence).
            progress: progress bars over benchmark items.
            journal: folder of the per-task item journals (resume inside a task).
            journal_key: ties the journals to this exact model state.

        The model is unchanged on return.
        """
        items, lm_eval_scores = [], []
        for task in self.tasks:
            if is_lm_eval_task(task):  # not journaled: lm-eval runs the whole task at once
                result = evaluate_task(engine, task, self.limit(task), include=self.lm_eval_include, seed=self.seed)
                items.append(result.items)
                if len(result.scores):  # metrics lm-eval aggregates itself (perplexity, BLEU)
                    lm_eval_scores.append(result.scores)
                continue
            spec = get_task(task)
            if hasattr(spec, "max_new_tokens") and spec.max_new_tokens != self.max_new_tokens:
                spec = spec.with_options(max_new_tokens=self.max_new_tokens)
            items.append(evaluate(engine, [spec], limit=self.limit(task), progress=progress, journal=journal,
                                  journal_key=journal_key))
        items = pd.concat(items, ignore_index=True)
        scores = pd.concat([aggregate(items, seed=self.seed), *lm_eval_scores], ignore_index=True)
        quality = []
        if requests:
            retention = edit_quality(engine, requests, reference[:len(requests)])
            for scope, frame in (("retention", retention), ("latest", latest)):
                if len(frame):
                    quality.append(summarize_quality(frame, seed=self.seed).assign(scope=scope))
        quality_frame = pd.concat(quality, ignore_index=True) if quality else pd.DataFrame()
        return {"items": items, "scores": scores, "edit_quality": quality_frame,
                "generations": self.probe(engine, probes)}

    def probe_prompts(self, sequence: Sequence[EditRequest]) -> list[str]:
        """The probe prompts of an edit sequence: its first ``n_generation_examples`` edit prompts."""
        return [r.prompt for r in sequence[: self.n_generation_examples]]

    @staticmethod
    def probe(engine: Engine, prompts: Sequence[str]) -> pd.DataFrame:
        """Greedy continuations of ``prompts`` (one line each)."""
        prompts = list(prompts)
        outputs = engine.generate_until([GenerationRequest(p, ("\n",), PROBE_MAX_TOKENS) for p in prompts])
        return pd.DataFrame({"prompt": prompts, "output": outputs})

    def collapsed_scores(self) -> pd.DataFrame:
        """Score rows of a collapsed checkpoint: no value, no interval, no items."""
        return pd.DataFrame({"task": list(self.tasks), "metric": "acc", "value": np.nan, "ci_low": np.nan,
                             "ci_high": np.nan, "n": 0})


def nonfinite_outputs(items: pd.DataFrame) -> bool:
    """Whether any scored item's model outputs were NaN or Inf (``finite`` is None for unscored rows)."""
    if "finite" not in items:
        return False
    return any(value is False or value is np.False_ for value in items["finite"])

"""General-ability benchmarks: declarative task specs over one evaluation engine.

>>> from editkit import load_model
>>> from editkit.benchmarks import evaluate, aggregate
>>> items = evaluate(load_model(), ["mmlu_cloze", "gsm8k"], limit=57)  # doctest: +SKIP
>>> aggregate(items)  # doctest: +SKIP
>>> paired_deltas(items_after_edits, items)  # doctest: +SKIP

Modules: :mod:`.engine` (the only code that runs the model), :mod:`.api` (the
model API types every other module shares), :mod:`.generation`
(batched greedy decoding), :mod:`.passes` (batched forward passes, shared
prefixes, automatic batch size), :mod:`.spec` (task dataclasses),
:mod:`.tasks` (registered tasks and loaders), :mod:`.extract` (answer
extraction), :mod:`.evaluation` (:func:`evaluate`, :func:`build_requests`),
:mod:`.metrics` (:func:`aggregate`, :func:`paired_deltas`,
:func:`constant_answer`).
"""

from __future__ import annotations

from .api import ContinuationScore, GenerationRequest, LanguageModel
from .engine import Engine
from .evaluation import TaskRequests, build_requests, evaluate, select_items
from .metrics import aggregate, constant_answer, paired_deltas
from .spec import ChoiceTask, Doc, GenerationTask, TaskSpec, UnknownTaskError
from .tasks import get_task, list_tasks, register_task

__all__ = [
    "evaluate",
    "aggregate",
    "paired_deltas",
    "constant_answer",
    "build_requests",
    "TaskRequests",
    "get_task",
    "list_tasks",
    "register_task",
    "select_items",
    "Engine",
    "ContinuationScore",
    "GenerationRequest",
    "LanguageModel",
    "UnknownTaskError",
    "TaskSpec",
    "ChoiceTask",
    "GenerationTask",
    "Doc",
]

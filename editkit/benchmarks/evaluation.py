"""Run tasks on a model and collect one row per item.

Every row carries the exact prompt, the choices or reference, the prediction,
the raw output of generation tasks, the task's version and a
``format_failure`` flag: nothing could be extracted from the output, or the
output is degenerate repetition (always False for likelihood-scored tasks,
where every item gets an answer). ``unusable`` is the same flag under its
earlier name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from tqdm.auto import tqdm

from .engine import Engine, LanguageModel
from .extract import is_degenerate
from .journal import ItemJournal, journal_header, journal_path
from .spec import Doc, TaskSpec
from .tasks import get_task

if TYPE_CHECKING:
    from ..models import LoadedModel

__all__ = ["evaluate", "select_items", "build_requests", "TaskRequests", "COLUMNS"]

log = logging.getLogger(__name__)

COLUMNS = (
    "task", "task_version", "item_id", "subject", "prompt", "choices", "target", "prediction", "correct",
    "output", "format_failure", "unusable", "finite", "num_fewshot",
)
"""Columns every row has, in this order; task-specific columns follow."""


def select_items(docs: Sequence[Doc], limit: int | None) -> list[Doc]:
    """A deterministic subset of at most ``limit`` documents, in their original order.

    Without subjects: the first ``limit``. With subjects: round robin over the
    sorted subjects, each contributing its items in file order, so ``limit=57``
    on MMLU gives the first item of every subject.
    """
    if limit is None or limit >= len(docs):
        return list(docs)
    if limit < 0:
        raise ValueError(f"limit must be non-negative, got {limit}")
    if all(doc.subject is None for doc in docs):
        return list(docs[:limit])
    by_subject: dict[str, list[Doc]] = {}
    for doc in docs:
        by_subject.setdefault(doc.subject or "", []).append(doc)
    queues = [by_subject[subject] for subject in sorted(by_subject)]
    chosen: set[str] = set()
    depth = 0
    while len(chosen) < limit:
        for queue in queues:
            if depth < len(queue) and len(chosen) < limit:
                chosen.add(queue[depth].item_id)
        depth += 1
    return [doc for doc in docs if doc.item_id in chosen]


def _resolve(task: str | TaskSpec) -> TaskSpec:
    return task if isinstance(task, TaskSpec) else get_task(task)


@dataclass(frozen=True)
class TaskRequests:
    """What a task asks of a model for a set of items.

    Attributes:
        spec: the task.
        docs: the items, in order.
        prompts: the exact prompt of each item.
        requests: the requests of each item (``(context, continuation)`` pairs
            or :class:`~editkit.benchmarks.engine.GenerationRequest`).
        num_fewshot: the number of shots used.
    """

    spec: TaskSpec
    docs: list[Doc]
    prompts: list[str]
    requests: list[list[Any]]
    num_fewshot: int

    @property
    def flat(self) -> list[Any]:
        """Every request, item after item (the order a model is asked in)."""
        return [request for requests in self.requests for request in requests]

    def slice(self, start: int, stop: int) -> TaskRequests:
        """The same task restricted to items ``start:stop``."""
        return replace(self, docs=self.docs[start:stop], prompts=self.prompts[start:stop],
                       requests=self.requests[start:stop])

    def rows(self, responses: Sequence[Any]) -> list[dict[str, Any]]:
        """One result row per item from the responses to :attr:`flat`, in that order."""
        if len(responses) != sum(len(requests) for requests in self.requests):
            raise RuntimeError(f"{self.spec.kind} returned {len(responses)} responses for "
                               f"{sum(len(r) for r in self.requests)} requests")
        rows, offset = [], 0
        for doc, prompt, requests in zip(self.docs, self.prompts, self.requests):
            result = self.spec.result(doc, responses[offset : offset + len(requests)])
            offset += len(requests)
            base = {"task": self.spec.name, "task_version": self.spec.version, "item_id": doc.item_id,
                    "subject": doc.subject, "prompt": prompt, "num_fewshot": self.num_fewshot}
            rows.append({**base, **result, **_format_flags(result)})
        return rows


def _format_flags(result: dict[str, Any]) -> dict[str, bool]:
    """``format_failure`` (and its alias ``unusable``) for one result row, whichever a task reports."""
    flag = result.get("format_failure", result.get("unusable"))
    if flag is None:
        output = result.get("output")
        flag = isinstance(output, str) and (result.get("prediction") is None or is_degenerate(output))
    return {"format_failure": bool(flag), "unusable": bool(flag)}


def build_requests(spec: TaskSpec, limit: int | None = None, num_fewshot: int | None = None,
                   source: str = "packaged") -> TaskRequests:
    """The items, prompts and model requests of one task (what :func:`evaluate` sends to a model).

    Args:
        spec: the task.
        limit: a deterministic subset of this many items (see :func:`select_items`).
        num_fewshot: override the task's number of shots.
        source: ``"packaged"`` or ``"hub"``.
    """
    docs = select_items(spec.load(spec.eval_split, source), limit)
    shots_wanted = spec.num_fewshot if num_fewshot is None else num_fewshot
    if shots_wanted and not spec.fewshot_split:
        raise ValueError(f"task {spec.name!r} has no few-shot split; use num_fewshot=0")
    pool = spec.load(spec.fewshot_split, source) if shots_wanted else []
    prompts = [spec.prompt(doc, spec.select_shots(doc, pool, shots_wanted) if shots_wanted else ()) for doc in docs]
    per_doc = [spec.requests(doc, prompt) for doc, prompt in zip(docs, prompts)]
    return TaskRequests(spec, docs, prompts, per_doc, shots_wanted)


def _ask(model: LanguageModel, task: TaskRequests) -> list[dict[str, Any]]:
    return task.rows(getattr(model, task.spec.kind)(task.flat))


@contextlib.contextmanager
def _inner_bars_off(model: LanguageModel) -> Iterator[None]:
    """Silence an engine's per-call bars while a per-item bar reports instead."""
    if not isinstance(model, Engine):
        yield
        return
    shown, model.progress = model.progress, False
    try:
        yield
    finally:
        model.progress = shown


def _run_task(model: LanguageModel, spec: TaskSpec, limit: int | None, num_fewshot: int | None,
              source: str, journal: Path | None, journal_key: str, journal_every: int,
              progress: bool) -> list[dict[str, Any]]:
    task = build_requests(spec, limit, num_fewshot, source)
    if journal is None:
        start = time.perf_counter()
        rows = _ask(model, task)
        log.info("%s: %d items (%d requests) in %.1f s", spec.name, len(task.docs),
                 sum(len(requests) for requests in task.requests), time.perf_counter() - start)
        return rows
    header = journal_header(spec.name, spec.version, task.num_fewshot, task.prompts, journal_key)
    record = ItemJournal(journal_path(journal, spec.name), header)
    rows = record.load([doc.item_id for doc in task.docs])
    with tqdm(total=len(task.docs), initial=len(rows), desc=spec.name, unit="item",
              disable=not progress) as bar, _inner_bars_off(model):
        for start in range(len(rows), len(task.docs), journal_every):
            done = _ask(model, task.slice(start, start + journal_every))
            record.append(done)
            rows.extend(done)
            bar.update(len(done))
    return rows


def evaluate(
    lm: LoadedModel | LanguageModel,
    tasks: str | TaskSpec | Sequence[str | TaskSpec],
    limit: int | None = None,
    *,
    batch_size: int | str = 8,
    progress: bool = True,
    num_fewshot: int | None = None,
    source: str = "packaged",
    journal: str | os.PathLike[str] | None = None,
    journal_key: str = "",
    journal_every: int = 16,
) -> pd.DataFrame:
    """Evaluate a model on benchmark tasks; one row per item.

    Args:
        lm: a loaded model (run through :class:`~editkit.benchmarks.engine.Engine`)
            or anything implementing :class:`~editkit.benchmarks.engine.LanguageModel`.
        tasks: task names (see :func:`~editkit.benchmarks.tasks.list_tasks`) or specs.
        limit: evaluate a deterministic subset of this many items per task
            (stratified by subject where items have one; see :func:`select_items`).
        batch_size: sequences per forward pass, or ``"auto"`` (only when ``lm``
            is a loaded model; see :class:`~editkit.benchmarks.engine.Engine`).
        progress: show progress bars (only when ``lm`` is a loaded model).
        num_fewshot: override every task's number of shots.
        source: ``"packaged"`` (default, offline) or ``"hub"`` (``datasets.load_dataset``).
        journal: a folder in which finished items are recorded every
            ``journal_every`` items (:mod:`~editkit.benchmarks.journal`); a rerun
            with the same folder evaluates only the items not yet recorded. The
            caller removes the folder once the result is saved.
        journal_key: what the recorded rows depend on beyond the task and its
            prompts: the model, and for an edited model its weights. A journal
            with another key is set aside and the task starts over.
        journal_every: items per slice when journaling. Slices batch
            separately, so scores can differ from an unjournaled run in float
            round-off.

    Returns:
        A frame with the columns of :data:`COLUMNS` (``prompt`` is the exact
        model input; ``choices`` is a list for choice tasks and None otherwise;
        ``target`` an index or reference text; ``prediction`` an index or the
        extracted text; ``output`` the raw generation; ``format_failure``
        (alias ``unusable``) nothing extractable or degenerate output;
        ``task_version`` the spec's version) plus task-specific ones:
        ``correct_norm``/``prediction_norm`` (acc_norm), ``correct_flexible``/
        ``prediction_flexible`` (GSM8K), ``logprobs`` (choice tasks).

    Raises:
        UnknownTaskError: a task name is not registered.
        ValueError: ``journal_every`` is not positive.
    """
    if journal_every < 1:
        raise ValueError(f"journal_every must be a positive number of items, got {journal_every}")
    specs = [_resolve(t) for t in ([tasks] if isinstance(tasks, (str, TaskSpec)) else tasks)]
    model = lm if isinstance(lm, LanguageModel) else Engine(lm, batch_size=batch_size, progress=progress)
    folder = None if journal is None else Path(journal)
    rows = [row for spec in specs for row in _run_task(model, spec, limit, num_fewshot, source, folder,
                                                         journal_key, journal_every, progress)]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=list(COLUMNS))
    extras = [column for column in frame.columns if column not in COLUMNS]
    frame = frame[list(COLUMNS) + extras]
    for column in frame.columns:
        # Keep None (not NaN) for missing text and mixed values, e.g. ``output`` of choice tasks.
        if not (pd.api.types.is_numeric_dtype(frame[column]) or pd.api.types.is_bool_dtype(frame[column])):
            frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
    return frame

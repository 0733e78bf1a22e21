"""Declarative task specifications.

A task is a frozen dataclass: where its documents come from, how a prompt is
built (lm-eval's ``description`` + few-shot examples + ``doc_to_text``), the
choices or reference answer, stop strings and answer extraction, and a version
written into every result row. One engine runs every task; adding a benchmark
means adding a spec, never touching the engine.

Prompt layout, as in lm-eval::

    header(doc)
    + for each shot: doc_to_text(shot) + target_delimiter + shot_target(shot) + fewshot_delimiter
    + doc_to_text(doc) + prompt_suffix

and a choice is scored as the continuation ``target_delimiter + choice``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from .api import GenerationRequest
from .extract import is_degenerate

__all__ = [
    "Doc", "HubSource", "TaskSpec", "ChoiceTask", "GenerationTask", "UnknownTaskError", "true_probability_mass",
]


class UnknownTaskError(KeyError, ValueError):
    """No task of that name is registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class Doc:
    """One benchmark item.

    Attributes:
        item_id: stable id within the task (e.g. ``"anatomy/12"``, ``"7"``).
        fields: the item's data in the task's packaged schema.
        subject: MMLU subject (or other stratum) used for few-shot selection,
            stratified limits and per-subject metrics; None if the task has none.
    """

    item_id: str
    fields: Mapping[str, Any]
    subject: str | None = None


@dataclass(frozen=True)
class HubSource:
    """The same data on the HuggingFace hub, read with ``datasets.load_dataset`` when asked for.

    Attributes:
        path: dataset id, e.g. ``"cais/mmlu"``.
        name: configuration, e.g. ``"all"`` or ``"main"``.
        splits: editkit split name -> hub split name (missing names map to themselves).
        convert: ``(rows, split) -> docs`` in the packaged schema and order.
        configs: read these configurations one after another instead of
            ``name`` (BBH has one per subtask); each row then carries its
            configuration under the key ``"config"``.
        local_splits: splits that are part of the task rather than of the hub
            dataset (fixed published exemplars): always read from editkit's own copy.
    """

    path: str
    name: str | None
    splits: Mapping[str, str]
    convert: Callable[[Sequence[Mapping[str, Any]], str], list[Doc]]
    configs: tuple[str, ...] = ()
    local_splits: frozenset[str] = frozenset()

    def load(self, split: str) -> list[Doc]:
        """Download (or read from the datasets cache) one split and convert it."""
        from datasets import load_dataset

        hub_split = self.splits.get(split, split)
        if not self.configs:
            return self.convert(list(load_dataset(self.path, self.name, split=hub_split)), split)
        rows = [{**row, "config": config} for config in self.configs
                for row in load_dataset(self.path, config, split=hub_split)]
        return self.convert(rows, split)


def _no_header(doc: Doc) -> str:
    return ""


@dataclass(frozen=True, kw_only=True)
class TaskSpec:
    """What every task declares.

    Attributes:
        name: registry name (``"mmlu"``).
        version: written into every result row; bump it when prompts or scoring change.
        summary: one line for listings.
        packaged: ``split -> docs`` from the data packaged with editkit (the default source).
        hub: the hub copy, used only when ``source="hub"`` is asked for.
        eval_split: the split that is scored.
        fewshot_split: where shots come from (None: zero-shot only).
        num_fewshot: default number of shots.
        header: lm-eval's ``description``, per document (e.g. naming the MMLU subject).
        doc_to_text: the question part of a prompt, ending where the answer starts.
        target_delimiter: between a question and its answer.
        fewshot_delimiter: after each shot.
        prompt_suffix: appended after the evaluated document's question only,
            not after the shots' (BBH's "Let's think step by step." cue).
    """

    kind: ClassVar[str] = ""  # which LanguageModel method scores the task

    name: str
    version: str
    summary: str
    packaged: Callable[[str], Sequence[Doc]]
    hub: HubSource | None = None
    eval_split: str = "test"
    fewshot_split: str | None = None
    num_fewshot: int = 0
    header: Callable[[Doc], str] = _no_header
    doc_to_text: Callable[[Doc], str]
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    prompt_suffix: str = ""

    def load(self, split: str, source: str = "packaged") -> list[Doc]:
        """Documents of ``split`` from ``source`` (``"packaged"`` or ``"hub"``)."""
        if source == "packaged":
            return list(self.packaged(split))
        if source == "hub":
            if self.hub is None:
                raise ValueError(f"task {self.name!r} has no hub source")
            if split in self.hub.local_splits:
                return list(self.packaged(split))
            return self.hub.load(split)
        raise ValueError(f"unknown source {source!r}; use 'packaged' or 'hub'")

    def shot_target(self, doc: Doc) -> str:
        """The answer text that follows a shot's question."""
        raise NotImplementedError

    def select_shots(self, doc: Doc, pool: Sequence[Doc], n: int) -> list[Doc]:
        """The first ``n`` pool documents (file order) with the document's subject, never the document itself."""
        same_split = self.fewshot_split == self.eval_split
        candidates = [s for s in pool if s.subject == doc.subject and not (same_split and s.item_id == doc.item_id)]
        if len(candidates) < n:
            raise ValueError(f"task {self.name!r}: {n} shots asked for, only {len(candidates)} available")
        return candidates[:n]

    def prompt(self, doc: Doc, shots: Sequence[Doc] = ()) -> str:
        """The exact text given to the model."""
        examples = "".join(
            self.doc_to_text(shot) + self.target_delimiter + self.shot_target(shot) + self.fewshot_delimiter
            for shot in shots
        )
        return self.header(doc) + examples + self.doc_to_text(doc) + self.prompt_suffix

    def with_options(self, **changes: Any) -> TaskSpec:
        """A copy with fields changed; the version records the change (``"1.0+max_new_tokens=64"``)."""
        changed = dataclasses.replace(self, **changes)
        tag = "+".join(f"{key}={value}" for key, value in sorted(changes.items()) if key != "version")
        return dataclasses.replace(changed, version=f"{changed.version}+{tag}") if tag else changed

    # Subclasses: the requests for one document and the result row built from the responses.
    def requests(self, doc: Doc, prompt: str) -> list[Any]:
        raise NotImplementedError

    def result(self, doc: Doc, responses: Sequence[Any]) -> dict[str, Any]:
        raise NotImplementedError


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # ties go to the lower index


def true_probability_mass(logprobs: Sequence[float], targets: Sequence[int]) -> float:
    """The probability mass on the true choices, normalised over all choices (lm-eval's TruthfulQA MC2).

    ``sum(p[t] for t in targets) / sum(p)`` with ``p = exp(logprobs)``,
    computed from log-sum-exps so long answers whose probabilities underflow
    to zero still give a number (lm-eval exponentiates directly and would give NaN).
    """
    if not targets:
        raise ValueError("true_probability_mass needs at least one true choice")
    top = max(logprobs)
    weights = [math.exp(lp - top) for lp in logprobs]
    return math.fsum(weights[t] for t in targets) / math.fsum(weights)


@dataclass(frozen=True, kw_only=True)
class ChoiceTask(TaskSpec):
    """Multiple choice scored by log-likelihood (lm-eval ``output_type: multiple_choice``).

    Rows get ``prediction`` (the most likely choice) and ``correct`` (acc: the
    prediction is the target, or one of the targets) and, with ``acc_norm``,
    ``prediction_norm``/``correct_norm`` (log-likelihood divided by the
    choice's length in characters, lm-eval's ``acc_norm``). Non-finite scores
    give ``prediction = -1``, ``finite = False`` and a wrong answer.

    Attributes:
        doc_to_choices: the answer options (each scored as ``target_delimiter + choice``).
        doc_to_target: the index of the correct choice, or a tuple of the
            indices of every true choice (TruthfulQA MC2). Shots show the first.
        acc_norm: also report length-normalised accuracy.
        score_item: when set, ``correct`` is this value in [0, 1] of the
            choices' log-likelihoods and the target indices instead of 0/1
            (lm-eval's ``process_results``; e.g. :func:`true_probability_mass`).
    """

    kind: ClassVar[str] = "loglikelihood"

    doc_to_choices: Callable[[Doc], Sequence[str]]
    doc_to_target: Callable[[Doc], int | tuple[int, ...]]
    acc_norm: bool = False
    score_item: Callable[[Sequence[float], Sequence[int]], float] | None = None

    def _targets(self, doc: Doc) -> tuple[int, ...]:
        target = self.doc_to_target(doc)
        return tuple(target) if isinstance(target, (tuple, list)) else (target,)

    def shot_target(self, doc: Doc) -> str:
        return self.doc_to_choices(doc)[self._targets(doc)[0]]

    def requests(self, doc: Doc, prompt: str) -> list[tuple[str, str]]:
        return [(prompt, self.target_delimiter + choice) for choice in self.doc_to_choices(doc)]

    def result(self, doc: Doc, responses: Sequence[tuple[float, bool]]) -> dict[str, Any]:
        choices = list(self.doc_to_choices(doc))
        target = self.doc_to_target(doc)
        targets = self._targets(doc)
        logprobs = [float(logprob) for logprob, _ in responses]
        finite = all(math.isfinite(lp) for lp in logprobs)
        prediction = _argmax(logprobs) if finite else -1
        if self.score_item is None:
            correct: bool | float = prediction in targets
        else:
            correct = float(self.score_item(logprobs, targets)) if finite else 0.0
        row: dict[str, Any] = {
            "choices": choices,
            "target": list(target) if isinstance(target, (tuple, list)) else target,
            "prediction": prediction,
            "correct": correct,
            "output": None,
            "unusable": False,
            "finite": finite,
            "logprobs": logprobs,
        }
        if self.acc_norm:
            normed = [lp / max(len(choice), 1) for lp, choice in zip(logprobs, choices)]
            row["prediction_norm"] = _argmax(normed) if finite else -1
            row["correct_norm"] = row["prediction_norm"] in targets
        return row


@dataclass(frozen=True, kw_only=True)
class GenerationTask(TaskSpec):
    """Greedy generation scored by answer extraction (lm-eval ``output_type: generate_until``).

    Attributes:
        doc_to_answer: the reference answer, or several acceptable ones.
        doc_to_solution: what follows a shot's question (e.g. a worked solution).
        until: stop strings.
        max_new_tokens: generation budget.
        extractors: ``(name, extractor)`` pairs, or ``(name, extractor,
            normalize)`` triples with their own normaliser. The first is
            primary: it gives ``prediction`` and ``correct``; each other one
            gives ``prediction_<name>`` and ``correct_<name>``.
        normalize: applied to predictions and references before comparing
            (unless an extractor brings its own).

    ``unusable`` is True when no extractor finds an answer or the output is
    degenerate repetition (:func:`~editkit.benchmarks.extract.is_degenerate`).
    """

    kind: ClassVar[str] = "generate_until"

    doc_to_answer: Callable[[Doc], str | Sequence[str]]
    doc_to_solution: Callable[[Doc], str]
    until: tuple[str, ...] = ()
    max_new_tokens: int = 256
    extractors: tuple[tuple[str, Callable[[str], str | None]]
                      | tuple[str, Callable[[str], str | None], Callable[[str], str]], ...]
    normalize: Callable[[str], str] = str.strip

    def shot_target(self, doc: Doc) -> str:
        return self.doc_to_solution(doc)

    def requests(self, doc: Doc, prompt: str) -> list[GenerationRequest]:
        return [GenerationRequest(prompt, self.until, self.max_new_tokens)]

    def result(self, doc: Doc, responses: Sequence[str]) -> dict[str, Any]:
        (output,) = responses
        answer = self.doc_to_answer(doc)
        references = [answer] if isinstance(answer, str) else list(answer)
        # The LanguageModel API returns "" for a generation that met non-finite logits: unknown here.
        row: dict[str, Any] = {"choices": None, "target": answer, "output": output, "finite": None}
        extracted = []
        for position, (name, extractor, *own) in enumerate(self.extractors):
            normalize = own[0] if own else self.normalize
            prediction = extractor(output)
            extracted.append(prediction)
            suffix = "" if position == 0 else f"_{name}"
            row[f"prediction{suffix}"] = prediction
            row[f"correct{suffix}"] = prediction is not None and normalize(prediction) in {
                normalize(reference) for reference in references}
        row["unusable"] = all(p is None for p in extracted) or is_degenerate(output)
        return row

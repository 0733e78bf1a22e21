"""Declarative task specifications.

A task is a frozen dataclass: where its documents come from, how a prompt is
built (lm-eval's ``description`` + few-shot examples + ``doc_to_text``), the
choices or reference answer, stop strings and answer extraction, and a version
written into every result row. One engine runs every task; adding a benchmark
means adding a spec, never touching the engine.

Prompt layout, as in lm-eval::

    header(doc)
    + for each shot: doc_to_text(shot) + target_delimiter + shot_target(shot) + fewshot_delimiter
    + doc_to_text(doc)

and a choice is scored as the continuation ``target_delimiter + choice``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from .engine import GenerationRequest
from .extract import is_degenerate

__all__ = ["Doc", "HubSource", "TaskSpec", "ChoiceTask", "GenerationTask", "UnknownTaskError"]


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
    """

    path: str
    name: str | None
    splits: Mapping[str, str]
    convert: Callable[[Sequence[Mapping[str, Any]], str], list[Doc]]

    def load(self, split: str) -> list[Doc]:
        """Download (or read from the datasets cache) one split and convert it."""
        from datasets import load_dataset

        rows = load_dataset(self.path, self.name, split=self.splits.get(split, split))
        return self.convert(list(rows), split)


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

    def load(self, split: str, source: str = "packaged") -> list[Doc]:
        """Documents of ``split`` from ``source`` (``"packaged"`` or ``"hub"``)."""
        if source == "packaged":
            return list(self.packaged(split))
        if source == "hub":
            if self.hub is None:
                raise ValueError(f"task {self.name!r} has no hub source")
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
        return self.header(doc) + examples + self.doc_to_text(doc)

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


@dataclass(frozen=True, kw_only=True)
class ChoiceTask(TaskSpec):
    """Multiple choice scored by log-likelihood (lm-eval ``output_type: multiple_choice``).

    Rows get ``correct`` (acc: the most likely choice is the target) and, with
    ``acc_norm``, ``correct_norm`` (log-likelihood divided by the choice's
    length in characters, lm-eval's ``acc_norm``). Non-finite scores give
    ``prediction = -1`` and ``finite = False``.
    """

    kind: ClassVar[str] = "loglikelihood"

    doc_to_choices: Callable[[Doc], Sequence[str]]
    doc_to_target: Callable[[Doc], int]
    acc_norm: bool = False

    def shot_target(self, doc: Doc) -> str:
        return self.doc_to_choices(doc)[self.doc_to_target(doc)]

    def requests(self, doc: Doc, prompt: str) -> list[tuple[str, str]]:
        return [(prompt, self.target_delimiter + choice) for choice in self.doc_to_choices(doc)]

    def result(self, doc: Doc, responses: Sequence[tuple[float, bool]]) -> dict[str, Any]:
        choices = list(self.doc_to_choices(doc))
        target = self.doc_to_target(doc)
        logprobs = [float(logprob) for logprob, _ in responses]
        finite = all(lp == lp and abs(lp) != float("inf") for lp in logprobs)
        prediction = _argmax(logprobs) if finite else -1
        row: dict[str, Any] = {
            "choices": choices,
            "target": target,
            "prediction": prediction,
            "correct": prediction == target,
            "output": None,
            "unusable": False,
            "finite": finite,
            "logprobs": logprobs,
        }
        if self.acc_norm:
            normed = [lp / max(len(choice), 1) for lp, choice in zip(logprobs, choices)]
            row["prediction_norm"] = _argmax(normed) if finite else -1
            row["correct_norm"] = row["prediction_norm"] == target
        return row


@dataclass(frozen=True, kw_only=True)
class GenerationTask(TaskSpec):
    """Greedy generation scored by answer extraction (lm-eval ``output_type: generate_until``).

    Attributes:
        doc_to_answer: the reference answer, or several acceptable ones.
        doc_to_solution: what follows a shot's question (e.g. a worked solution).
        until: stop strings.
        max_new_tokens: generation budget.
        extractors: ``(name, extractor)`` pairs. The first is primary: it gives
            ``prediction`` and ``correct``; each other one gives
            ``prediction_<name>`` and ``correct_<name>``.
        normalize: applied to predictions and references before comparing.

    ``unusable`` is True when no extractor finds an answer or the output is
    degenerate repetition (:func:`~editkit.benchmarks.extract.is_degenerate`).
    """

    kind: ClassVar[str] = "generate_until"

    doc_to_answer: Callable[[Doc], str | Sequence[str]]
    doc_to_solution: Callable[[Doc], str]
    until: tuple[str, ...] = ()
    max_new_tokens: int = 256
    extractors: tuple[tuple[str, Callable[[str], str | None]], ...]
    normalize: Callable[[str], str] = str.strip

    def shot_target(self, doc: Doc) -> str:
        return self.doc_to_solution(doc)

    def requests(self, doc: Doc, prompt: str) -> list[GenerationRequest]:
        return [GenerationRequest(prompt, self.until, self.max_new_tokens)]

    def result(self, doc: Doc, responses: Sequence[str]) -> dict[str, Any]:
        (output,) = responses
        answer = self.doc_to_answer(doc)
        accepted = {self.normalize(a) for a in ([answer] if isinstance(answer, str) else answer)}
        # The LanguageModel API returns "" for a generation that met non-finite logits: unknown here.
        row: dict[str, Any] = {"choices": None, "target": answer, "output": output, "finite": None}
        extracted = []
        for position, (name, extractor) in enumerate(self.extractors):
            prediction = extractor(output)
            extracted.append(prediction)
            suffix = "" if position == 0 else f"_{name}"
            row[f"prediction{suffix}"] = prediction
            row[f"correct{suffix}"] = prediction is not None and self.normalize(prediction) in accepted
        row["unusable"] = all(p is None for p in extracted) or is_degenerate(output)
        return row

"""The registered tasks and their data loaders.

Prompts follow lm-evaluation-harness so any item can be cross-checked against
it: ``mmlu`` is lm-eval's ``mmlu`` (default template), ``mmlu_cloze`` its
``mmlu_continuation`` variant, ``gsm8k`` its ``gsm8k`` task with the first 8
training problems as shots. The other tasks live in their own modules:
:mod:`.bbh` (``bbh_cot``, ``bbh_direct``), :mod:`.commonsense_qa`
(``commonsense_qa``, ``commonsense_qa_cloze``, ``commonsense_qa_gen``),
:mod:`.triviaqa`, :mod:`.truthfulqa` (``truthfulqa_mc1``, ``truthfulqa_mc2``)
and :mod:`.toxigen`. The default source is the data packaged with editkit
(see ``editkit/data/README``); ``source="hub"`` reads the same splits with
``datasets.load_dataset`` from lm-eval's dataset ids (``cais/mmlu`` ``all``;
``openai/gsm8k`` ``main``; the others in their modules).

Data is read lazily, on the first request, and kept (it is immutable and does
not depend on the model).
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import functools
import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

from ..resources import list_files, read_text
from .bbh import BBH_COT, BBH_DIRECT
from .commonsense_qa import COMMONSENSE_QA, COMMONSENSE_QA_CLOZE, COMMONSENSE_QA_GEN
from .extract import gsm8k_flexible, gsm8k_strict, normalize_number
from .spec import ChoiceTask, Doc, GenerationTask, HubSource, TaskSpec, UnknownTaskError
from .toxigen import TOXIGEN
from .triviaqa import TRIVIAQA
from .truthfulqa import TRUTHFULQA_MC1, TRUTHFULQA_MC2

__all__ = ["MMLU", "MMLU_CLOZE", "GSM8K", "ALIASES", "get_task", "list_tasks", "register_task"]

LETTERS = ("A", "B", "C", "D")


# -- MMLU ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _mmlu_packaged(split: str) -> tuple[Doc, ...]:
    """MMLU ``dev``/``val``/``test`` from the Hendrycks CSVs: subjects sorted, rows in file order."""
    folder = f"mmlu/{split}/"
    files = list_files(folder)
    if not files:
        raise ValueError(f"no packaged MMLU split {split!r}; use 'dev', 'val' or 'test'")
    docs = []
    for path in files:
        subject = path[len(folder) :].removesuffix(f"_{split}.csv")
        for index, row in enumerate(csv.reader(io.StringIO(read_text(path), newline=""))):
            question, *choices, answer = row
            # One college_mathematics dev question has CRLF line ends; the hub copy has LF.
            fields = {"question": question.replace("\r\n", "\n"), "choices": tuple(choices),
                      "answer": LETTERS.index(answer.strip())}
            docs.append(Doc(f"{subject}/{index}", fields, subject))
    return tuple(docs)


def _mmlu_from_hub(rows: Sequence[Mapping[str, Any]], split: str) -> list[Doc]:
    counts: dict[str, int] = {}
    docs = []
    for row in sorted(rows, key=lambda r: r["subject"]):  # stable: file order within a subject
        subject = row["subject"]
        index = counts[subject] = counts.get(subject, -1) + 1
        fields = {"question": row["question"], "choices": tuple(row["choices"]), "answer": int(row["answer"])}
        docs.append(Doc(f"{subject}/{index}", fields, subject))
    return docs


_MMLU_HUB = HubSource(path="cais/mmlu", name="all", splits={"val": "validation"}, convert=_mmlu_from_hub)


def _subject_words(doc: Doc) -> str:
    return (doc.subject or "").replace("_", " ")


def _mmlu_header(doc: Doc) -> str:
    return f"The following are multiple choice questions (with answers) about {_subject_words(doc)}.\n\n"


def _mmlu_text(doc: Doc) -> str:
    question, choices = doc.fields["question"], doc.fields["choices"]
    options = "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, choices, strict=True))
    return f"{question.strip()}{options}\nAnswer:"


def _letters(doc: Doc) -> Sequence[str]:
    return LETTERS


def _answer_index(doc: Doc) -> int:
    return doc.fields["answer"]


def _cloze_header(doc: Doc) -> str:
    return f"The following are questions (with answers) about {_subject_words(doc)}.\n\n"


def _cloze_text(doc: Doc) -> str:
    return f"Question: {doc.fields['question'].strip()}\nAnswer:"


def _answer_texts(doc: Doc) -> Sequence[str]:
    return doc.fields["choices"]


MMLU = ChoiceTask(
    name="mmlu",
    version="1.0",
    summary="MMLU, 5-shot, lettered options scored by the log-likelihood of ' A'..' D' (lm-eval mmlu)",
    packaged=_mmlu_packaged,
    hub=_MMLU_HUB,
    eval_split="test",
    fewshot_split="dev",
    num_fewshot=5,
    header=_mmlu_header,
    doc_to_text=_mmlu_text,
    doc_to_choices=_letters,
    doc_to_target=_answer_index,
)

# The same items and shots as MMLU; only the prompt and what is scored differ.
MMLU_CLOZE = dataclasses.replace(
    MMLU,
    name="mmlu_cloze",
    summary="MMLU, 5-shot, answer texts scored by log-likelihood; acc and acc_norm (lm-eval mmlu_continuation)",
    header=_cloze_header,
    doc_to_text=_cloze_text,
    doc_to_choices=_answer_texts,
    acc_norm=True,
)


# -- GSM8K --------------------------------------------------------------------------------------


def _gsm8k_docs(lines: Sequence[Mapping[str, Any]]) -> list[Doc]:
    return [Doc(str(i), {"question": row["question"], "answer": row["answer"]}) for i, row in enumerate(lines)]


@functools.lru_cache(maxsize=2)
def _gsm8k_packaged(split: str) -> tuple[Doc, ...]:
    """GSM8K ``train``/``test`` from the openai/grade-school-math JSONL files, in file order."""
    if split not in ("train", "test"):
        raise ValueError(f"no packaged GSM8K split {split!r}; use 'train' or 'test'")
    lines = read_text(f"gsm8k/{split}.jsonl").splitlines()
    return tuple(_gsm8k_docs([json.loads(line) for line in lines if line.strip()]))


def _gsm8k_from_hub(rows: Sequence[Mapping[str, Any]], split: str) -> list[Doc]:
    return _gsm8k_docs(rows)


def _gsm8k_text(doc: Doc) -> str:
    return f"Question: {doc.fields['question']}\nAnswer:"


def _gsm8k_solution(doc: Doc) -> str:
    return doc.fields["answer"]


def _gsm8k_answer(doc: Doc) -> str:
    return doc.fields["answer"].split("####")[-1].strip()


GSM8K = GenerationTask(
    name="gsm8k",
    version="1.0",
    summary="GSM8K, 8-shot chain of thought (first 8 train problems), greedy; strict '#### n' and flexible match",
    packaged=_gsm8k_packaged,
    hub=HubSource(path="openai/gsm8k", name="main", splits={}, convert=_gsm8k_from_hub),
    eval_split="test",
    fewshot_split="train",
    num_fewshot=8,
    doc_to_text=_gsm8k_text,
    doc_to_answer=_gsm8k_answer,
    doc_to_solution=_gsm8k_solution,
    # lm-eval's stops plus the EOS texts of common chat models (the engine also stops on EOS ids).
    until=("Question:", "\n\n", "</s>", "<|im_end|>", "<|endoftext|>"),
    max_new_tokens=256,
    extractors=(("strict", gsm8k_strict), ("flexible", gsm8k_flexible)),
    normalize=normalize_number,
)


# -- registry -----------------------------------------------------------------------------------

_REGISTRY: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (MMLU, MMLU_CLOZE, GSM8K, BBH_COT, BBH_DIRECT, COMMONSENSE_QA, COMMONSENSE_QA_CLOZE,
                 COMMONSENSE_QA_GEN, TRIVIAQA, TRUTHFULQA_MC1, TRUTHFULQA_MC2, TOXIGEN)
}

# Group names that stand for one registered variant, as in lm-eval (whose ``bbh`` group is
# ``bbh_cot_fewshot``: 3-shot chain of thought). Rows carry the variant's name.
ALIASES: dict[str, str] = {"bbh": "bbh_cot"}


def list_tasks() -> list[str]:
    """Names of the registered tasks, sorted."""
    return sorted(_REGISTRY)


def get_task(name: str) -> TaskSpec:
    """The task registered as ``name`` (or the variant an alias in :data:`ALIASES` names).

    Raises:
        UnknownTaskError: no such task; the message lists the known ones and close matches.
    """
    try:
        return _REGISTRY[ALIASES.get(name, name)]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY) + list(ALIASES), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise UnknownTaskError(f"unknown task {name!r}{hint} (known: {', '.join(list_tasks())})") from None


def register_task(spec: TaskSpec, *, replace: bool = False) -> TaskSpec:
    """Add a task to the registry (``replace=True`` to overwrite one of the same name)."""
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"a task named {spec.name!r} is already registered; pass replace=True")
    _REGISTRY[spec.name] = spec
    return spec

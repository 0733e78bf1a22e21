"""BIG-Bench Hard: 27 subtasks, 3-shot, direct answers and chain of thought.

Suzgun et al., "Challenging BIG-Bench Tasks and Whether Chain-of-Thought Can
Solve Them" (arXiv 2210.09261); data and prompts from
``suzgunmirac/BIG-Bench-Hard`` (``bbh/*.json``, ``cot-prompts/*.txt``), packaged
with editkit. Every subtask is a ``subject``, so limits are stratified,
results come per subtask and the macro average is reported next to the
item-weighted mean (lm-eval's group score, ``weight_by_size: true``).

Two registered tasks, lm-eval's ``bbh_cot_fewshot`` and ``bbh_fewshot``:

* ``bbh_cot``: the published chain-of-thought prompt of each subtask, i.e.
  its description, the three worked exemplars as written in its
  ``cot-prompts`` file, then ``"Q: <input>\\nA: Let's think step by step.\\n"``.
  The answer is what follows "the answer is " (lm-eval's ``get-answer``
  regex, which drops the line's last character, normally the period); a
  flexible reading (the last "the answer is ...", case-insensitive, with or
  without a final period) is reported as ``correct_flexible``. Stops at
  ``"Q"`` and ``"\\n\\n"`` as lm-eval does, at most 1,024 new tokens.
* ``bbh_direct``: the same description and exemplars with only their final
  answer (``"Q: <input>\\nA: (B)"``); the stripped output must equal the
  target. At most 256 new tokens.

Deviations, checked against lm-eval 0.4.13's YAMLs (``tests/test_golden_prompts.py``):

* sports_understanding: the published exemplars continue the cue's line with
  the rationale ("A: Let's think step by step. Bam Adebayo ..."); lm-eval
  starts it on a new line, as every other subtask's exemplars do. editkit keeps
  the published text. (In the other 26 subtasks lm-eval 0.4.13's shots are the
  published exemplars. 0.4.9 stored most rationales with a leading "Let's think
  step by step.\\n" joined to ``doc_to_text`` with a space, so its shots read
  "A: Let's think step by step.\\n Let's think step by step.\\n...".)
* lm-eval compares the direct answer without stripping it, so with
  tokenizers that keep a leading space (GPT-2-style BPE) ``" (B)"`` never
  equals ``"(B)"``; editkit strips surrounding whitespace.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ..resources import list_files, read_text
from .extract import bbh_cot_flexible, bbh_cot_strict, whole_output
from .spec import Doc, GenerationTask, HubSource

__all__ = ["BBH_COT", "BBH_DIRECT", "SUBTASKS", "bbh_subtasks"]

_COT_CUE = "Let's think step by step."
_DIRECT_ANSWER = re.compile(r"(?<=answer is )(.*)(?=.)")  # how lm-eval derives the direct exemplars' answers

# 27 subtasks in file-name order (hard-coded so that the hub source needs no packaged data).
SUBTASKS = (
    "boolean_expressions", "causal_judgement", "date_understanding", "disambiguation_qa", "dyck_languages",
    "formal_fallacies", "geometric_shapes", "hyperbaton", "logical_deduction_five_objects",
    "logical_deduction_seven_objects", "logical_deduction_three_objects", "movie_recommendation",
    "multistep_arithmetic_two", "navigate", "object_counting", "penguins_in_a_table",
    "reasoning_about_colored_objects", "ruin_names", "salient_translation_error_detection", "snarks",
    "sports_understanding", "temporal_sequences", "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects", "tracking_shuffled_objects_three_objects", "web_of_lies",
    "word_sorting",
)


def bbh_subtasks() -> list[str]:
    """Names of the packaged subtasks (the files under ``bbh/tasks/``)."""
    return [path.rsplit("/", 1)[1].removesuffix(".json") for path in list_files("bbh/tasks/")]


@functools.cache
def _cot_prompt(subtask: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """A subtask's description and its exemplars as ``(input, answer)`` pairs.

    A prompt file is a canary line, ``-----``, the description (one or more
    paragraphs) and exemplars ``"Q: <input>\\nA: <answer>"`` separated by
    blank lines, each answer being "Let's think step by step." and the
    rationale (after a line break, or a space in sports_understanding).
    """
    body = read_text(f"bbh/cot-prompts/{subtask}.txt").split("\n-----\n", 1)[1]
    first = body.index("\n\nQ: ")
    description, rest = body[:first], body[first + 2 :]
    exemplars = []
    for block in re.split(r"\n\n(?=Q: )", rest.strip("\n")):
        question, answer = block.removeprefix("Q: ").split("\nA: ", 1)
        if not answer.startswith(_COT_CUE):
            raise ValueError(f"bbh {subtask}: an exemplar's answer does not start with {_COT_CUE!r}")
        exemplars.append((question, answer))
    return description, tuple(exemplars)


def _docs(rows: Sequence[Mapping[str, Any]], subtask: str) -> list[Doc]:
    return [Doc(f"{subtask}/{i}", {"input": row["input"], "target": row["target"]}, subtask)
            for i, row in enumerate(rows)]


@functools.lru_cache(maxsize=2)
def _bbh_packaged(split: str) -> tuple[Doc, ...]:
    """``test``: every subtask's examples in file order; ``fewshot``: the 3 exemplars of each subtask."""
    docs: list[Doc] = []
    for subtask in bbh_subtasks():
        if split == "test":
            docs += _docs(json.loads(read_text(f"bbh/tasks/{subtask}.json"))["examples"], subtask)
        elif split == "fewshot":
            for i, (question, answer) in enumerate(_cot_prompt(subtask)[1]):
                final = _DIRECT_ANSWER.search(answer)
                if final is None:
                    raise ValueError(f"bbh {subtask} exemplar {i}: no 'answer is' in its rationale")
                fields = {"input": question, "target": final.group(0), "cot_answer": answer}
                docs.append(Doc(f"{subtask}/shot{i}", fields, subtask))
        else:
            raise ValueError(f"no packaged BBH split {split!r}; use 'test' or 'fewshot'")
    return tuple(docs)


def _bbh_from_hub(rows: Sequence[Mapping[str, Any]], split: str) -> list[Doc]:
    by_subtask: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_subtask.setdefault(row["config"], []).append(row)
    return [doc for subtask in sorted(by_subtask) for doc in _docs(by_subtask[subtask], subtask)]


_BBH_HUB = HubSource(path="SaylorTwift/bbh", name=None, splits={}, convert=_bbh_from_hub, configs=SUBTASKS,
                     local_splits=frozenset({"fewshot"}))


def _header(doc: Doc) -> str:
    return _cot_prompt(doc.subject)[0] + "\n\n"


def _question(doc: Doc) -> str:
    return f"Q: {doc.fields['input']}\nA:"


def _target(doc: Doc) -> str:
    return doc.fields["target"]


def _cot_answer(doc: Doc) -> str:
    return doc.fields["cot_answer"]


_STOPS = ("Q", "\n\n", "</s>", "<|im_end|>", "<|endoftext|>")  # lm-eval's, plus common chat EOS texts

BBH_COT = GenerationTask(
    name="bbh_cot",
    version="1.0",
    summary="BIG-Bench Hard, 27 subtasks, 3-shot chain of thought (published prompts), 'the answer is' "
            "extraction (lm-eval bbh_cot_fewshot)",
    packaged=_bbh_packaged,
    hub=_BBH_HUB,
    eval_split="test",
    fewshot_split="fewshot",
    num_fewshot=3,
    header=_header,
    doc_to_text=_question,
    prompt_suffix=f" {_COT_CUE}\n",
    doc_to_answer=_target,
    doc_to_solution=_cot_answer,
    until=_STOPS,
    max_new_tokens=1024,
    extractors=(("strict", bbh_cot_strict), ("flexible", bbh_cot_flexible)),
)

BBH_DIRECT = GenerationTask(
    name="bbh_direct",
    version="1.0",
    summary="BIG-Bench Hard, 27 subtasks, 3-shot direct answers, exact match (lm-eval bbh_fewshot)",
    packaged=_bbh_packaged,
    hub=_BBH_HUB,
    eval_split="test",
    fewshot_split="fewshot",
    num_fewshot=3,
    header=_header,
    doc_to_text=_question,
    doc_to_answer=_target,
    doc_to_solution=_target,
    until=_STOPS,
    max_new_tokens=256,
    extractors=(("exact", whole_output),),
)

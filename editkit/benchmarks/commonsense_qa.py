"""CommonsenseQA: 1,221 validation questions with five answer options, 7-shot.

Talmor et al., "CommonsenseQA: A Question Answering Challenge Targeting
Commonsense Knowledge" (arXiv 1811.00937). The packaged file is the Hugging
Face ``tau/commonsense_qa`` validation split (lm-eval scores that split; the
test labels are not public).

Shots. The seven shots are the CommonsenseQA exemplars of the chain-of-thought
paper (Wei et al., arXiv 2201.11903, appendix), the usual "7-shot" CSQA
prompt: seven training questions with a written rationale. They are part of
the task, so the hub source uses them too. Three of them were published with
four options and are shown with four. The published fox exemplar ends "So
the answer is (b)" although its answer, natural habitat, is (c); editkit uses (c).
lm-eval's ``commonsense_qa`` instead samples shots at random from the train
split, which is not packaged, so its few-shot prompts cannot be reproduced offline.

Three registered variants over the same items and shots:

* ``commonsense_qa``: lm-eval's ``commonsense_qa`` prompt
  (``"Question: ...\\nA. ...\\nE. ...\\nAnswer:"``), the letters scored by
  log-likelihood, ``acc``.
* ``commonsense_qa_cloze``: ``"Question: ...\\nAnswer:"`` with the answer
  texts scored (as lm-eval's ``mmlu_continuation``), ``acc`` and ``acc_norm``.
* ``commonsense_qa_gen``: the chain-of-thought paper's own format
  (``"Q: ... Answer Choices: (a) ... (e) ...\\nA: <rationale> So the answer
  is (c)."``), greedy generation, strict ("the answer is (x)") and flexible
  (the last "(x)") extraction.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

from ..resources import read_text
from .extract import letter_extractor
from .spec import ChoiceTask, Doc, GenerationTask, HubSource

__all__ = ["COMMONSENSE_QA", "COMMONSENSE_QA_CLOZE", "COMMONSENSE_QA_GEN", "WEI_2022_EXEMPLARS"]

LETTERS = ("A", "B", "C", "D", "E")

# (question, choices, index of the answer, rationale) as published by Wei et al. (2022), fox answer corrected.
WEI_2022_EXEMPLARS: tuple[tuple[str, tuple[str, ...], int, str], ...] = (
    ("What do people use to absorb extra ink from a fountain pen?",
     ("shirt pocket", "calligrapher's hand", "inkwell", "desk drawer", "blotter"), 4,
     "The answer must be an item that can absorb ink. Of the above choices, only blotters are used to absorb ink."),
    ("What home entertainment equipment requires cable?",
     ("radio shack", "substation", "television", "cabinet"), 2,
     "The answer must require cable. Of the above choices, only television requires cable."),
    ("The fox walked from the city into the forest, what was it looking for?",
     ("pretty flowers", "hen house", "natural habitat", "storybook"), 2,
     "The answer must be something in the forest. Of the above choices, only natural habitat is in the forest."),
    ("Sammy wanted to go to where the people were. Where might he go?",
     ("populated areas", "race track", "desert", "apartment", "roadblock"), 0,
     "The answer must be a place with a lot of people. Of the above choices, only populated areas have a lot of "
     "people."),
    ("Where do you put your grapes just before checking out?",
     ("mouth", "grocery cart", "super market", "fruit basket", "fruit market"), 1,
     "The answer should be the place where grocery items are placed before checking out. Of the above choices, "
     "grocery cart makes the most sense for holding grocery items."),
    ("Google Maps and other highway and street GPS services have replaced what?",
     ("united states", "mexico", "countryside", "atlas"), 3,
     "The answer must be something that used to do what Google Maps and GPS services do, which is to give "
     "directions. Of the above choices, only atlases are used to give directions."),
    ("Before getting a divorce, what did the wife feel who was doing all the work?",
     ("harder", "anguish", "bitterness", "tears", "sadness"), 2,
     "The answer should be the feeling of someone getting divorced who was doing all the work. Of the above "
     "choices, the closest feeling is bitterness."),
)


def _doc(row: Mapping[str, Any], item_id: str) -> Doc:
    choices = row["choices"]
    options = {"label": tuple(choices["label"]), "text": tuple(choices["text"])}
    fields = {"question": row["question"], "choices": options, "answerKey": row["answerKey"]}
    if "rationale" in row:
        fields["rationale"] = row["rationale"]
    return Doc(item_id, fields)


def _exemplars() -> list[Doc]:
    docs = []
    for i, (question, choices, answer, rationale) in enumerate(WEI_2022_EXEMPLARS):
        labels = LETTERS[: len(choices)]
        row = {"question": question, "choices": {"label": labels, "text": choices}, "answerKey": labels[answer],
               "rationale": rationale}
        docs.append(_doc(row, f"wei2022/{i}"))
    return docs


@functools.lru_cache(maxsize=2)
def _csqa_packaged(split: str) -> tuple[Doc, ...]:
    """``validation``: the 1,221 dev questions in file order; ``fewshot``: the seven exemplars."""
    if split == "fewshot":
        return tuple(_exemplars())
    if split != "validation":
        raise ValueError(f"no packaged CommonsenseQA split {split!r}; use 'validation' or 'fewshot'")
    lines = read_text("commonsenseqa/dev_rand_split.hf_format.jsonl").splitlines()
    return tuple(_doc(row, row["id"]) for row in map(json.loads, filter(str.strip, lines)))


def _csqa_from_hub(rows: Sequence[Mapping[str, Any]], split: str) -> list[Doc]:
    return [_doc(row, row["id"]) for row in rows]


_CSQA_HUB = HubSource(path="tau/commonsense_qa", name=None, splits={}, convert=_csqa_from_hub,
                      local_splits=frozenset({"fewshot"}))


def _texts(doc: Doc) -> Sequence[str]:
    return doc.fields["choices"]["text"]


def _labels(doc: Doc) -> Sequence[str]:
    return doc.fields["choices"]["label"]


def _answer_index(doc: Doc) -> int:
    return list(_labels(doc)).index(doc.fields["answerKey"])


def _lettered_text(doc: Doc) -> str:
    options = "".join(f"\n{label}. {text}" for label, text in zip(_labels(doc), _texts(doc), strict=True))
    return f"Question: {doc.fields['question'].strip()}{options}\nAnswer:"


def _cloze_text(doc: Doc) -> str:
    return f"Question: {doc.fields['question'].strip()}\nAnswer:"


def _cot_text(doc: Doc) -> str:
    options = " ".join(f"({label.lower()}) {text}" for label, text in zip(_labels(doc), _texts(doc), strict=True))
    return f"Q: {doc.fields['question']} Answer Choices: {options}\nA:"


def _cot_solution(doc: Doc) -> str:
    return f"{doc.fields['rationale']} So the answer is ({doc.fields['answerKey'].lower()})."


def _answer_key(doc: Doc) -> str:
    return doc.fields["answerKey"]


COMMONSENSE_QA = ChoiceTask(
    name="commonsense_qa",
    version="1.0",
    summary="CommonsenseQA validation, 7-shot (Wei et al. exemplars), letters A-E scored by log-likelihood "
            "(lm-eval commonsense_qa prompt)",
    packaged=_csqa_packaged,
    hub=_CSQA_HUB,
    eval_split="validation",
    fewshot_split="fewshot",
    num_fewshot=7,
    doc_to_text=_lettered_text,
    doc_to_choices=_labels,
    doc_to_target=_answer_index,
)

COMMONSENSE_QA_CLOZE = dataclasses.replace(
    COMMONSENSE_QA,
    name="commonsense_qa_cloze",
    summary="CommonsenseQA validation, 7-shot, answer texts scored by log-likelihood; acc and acc_norm",
    doc_to_text=_cloze_text,
    doc_to_choices=_texts,
    acc_norm=True,
)

COMMONSENSE_QA_GEN = GenerationTask(
    name="commonsense_qa_gen",
    version="1.0",
    summary="CommonsenseQA validation, 7-shot chain of thought (Wei et al. prompt), greedy; "
            "'the answer is (x)' and flexible extraction",
    packaged=_csqa_packaged,
    hub=_CSQA_HUB,
    eval_split="validation",
    fewshot_split="fewshot",
    num_fewshot=7,
    doc_to_text=_cot_text,
    doc_to_answer=_answer_key,
    doc_to_solution=_cot_solution,
    until=("\n\n", "Q:", "</s>", "<|im_end|>", "<|endoftext|>"),
    max_new_tokens=256,
    extractors=(("strict", letter_extractor(r"the answer is \(([a-e])\)")),
                ("flexible", letter_extractor(r"\(([a-e])\)", select=-1))),
)

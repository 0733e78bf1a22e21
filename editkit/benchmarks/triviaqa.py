"""TriviaQA, zero-shot, closed book: exact match against the answer's aliases.

Joshi et al., "TriviaQA: A Large Scale Distantly Supervised Challenge Dataset
for Reading Comprehension" (arXiv 1705.03551). lm-eval's ``triviaqa`` scores
the 17,944 questions of the ``rc.nocontext`` validation split; **the packaged
data is only 1,000 questions** (``triviaqa/test.jsonl`` of a Stanford CS336
assignment, in the Hugging Face answer schema, split of origin undocumented;
see ``editkit/data/README.md``). ``source="hub"`` reads the full validation split.

Prompt and scoring are lm-eval's: ``"Question: <question>?\\nAnswer:"`` (the
"?" is added even after a question mark, as lm-eval does), greedy decoding
stopped at a newline, "." or ",", leading whitespace removed, and a match when
the output equals any alias after lower-casing and removing ASCII punctuation
(``correct``). ``correct_normalized`` uses TriviaQA's own normalisation
(articles and the quote marks ‘ ’ ´ ` also dropped, whitespace collapsed),
under which the aliases become the dataset's ``normalized_aliases``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

from ..resources import read_text
from .extract import first_answer, normalize_exact_match, normalize_triviaqa
from .spec import Doc, GenerationTask, HubSource

__all__ = ["TRIVIAQA"]

_ANSWER_KEYS = ("value", "aliases", "normalized_aliases", "normalized_value")


def _docs(rows: Sequence[Mapping[str, Any]]) -> list[Doc]:
    docs = []
    for row in rows:
        answer = {key: row["answer"][key] for key in _ANSWER_KEYS}
        answer["aliases"], answer["normalized_aliases"] = tuple(answer["aliases"]), tuple(answer["normalized_aliases"])
        docs.append(Doc(row["question_id"], {"question": row["question"], "answer": answer}))
    return docs


@functools.lru_cache(maxsize=1)
def _triviaqa_packaged(split: str) -> tuple[Doc, ...]:
    """``test``: the 1,000 packaged questions in file order."""
    if split != "test":
        raise ValueError(f"no packaged TriviaQA split {split!r}; use 'test' (1,000 questions)")
    return tuple(_docs([json.loads(line) for line in read_text("triviaqa/test.jsonl").splitlines() if line.strip()]))


def _triviaqa_from_hub(rows: Sequence[Mapping[str, Any]], split: str) -> list[Doc]:
    return _docs(rows)


def _text(doc: Doc) -> str:
    return f"Question: {doc.fields['question']}?\nAnswer:"


def _aliases(doc: Doc) -> list[str]:
    return list(doc.fields["answer"]["aliases"])


def _first_alias(doc: Doc) -> str:
    return doc.fields["answer"]["aliases"][0]


TRIVIAQA = GenerationTask(
    name="triviaqa",
    version="1.0",
    summary="TriviaQA (packaged: 1,000 questions; hub: rc.nocontext validation), 0-shot, exact match "
            "against any alias (lm-eval triviaqa)",
    packaged=_triviaqa_packaged,
    hub=HubSource(path="trivia_qa", name="rc.nocontext", splits={"test": "validation"}, convert=_triviaqa_from_hub),
    eval_split="test",
    doc_to_text=_text,
    doc_to_answer=_aliases,
    doc_to_solution=_first_alias,
    until=("\n", ".", ","),
    max_new_tokens=256,
    extractors=(("exact", first_answer, normalize_exact_match), ("normalized", first_answer, normalize_triviaqa)),
)

"""Answer extraction and output checks for generation tasks (lm-eval's filters).

Extractors map a raw generation to an answer string, or None when nothing can
be extracted. Normalisers map an answer to the form that is compared.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable

__all__ = [
    "regex_extractor",
    "GSM8K_STRICT",
    "GSM8K_FLEXIBLE",
    "gsm8k_strict",
    "gsm8k_flexible",
    "normalize_number",
    "is_degenerate",
    "BBH_ANSWER",
    "bbh_cot_strict",
    "bbh_cot_flexible",
    "whole_output",
    "first_answer",
    "normalize_exact_match",
    "normalize_triviaqa",
    "letter_extractor",
]

GSM8K_STRICT = r"#### (\-?[0-9\.\,]+)"
"""lm-eval ``gsm8k`` ``strict-match``: the number after ``####`` (first match)."""

GSM8K_FLEXIBLE = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
"""lm-eval ``gsm8k`` ``flexible-extract``: the last number-like span in the output."""


def regex_extractor(pattern: str, select: int = 0) -> Callable[[str], str | None]:
    """An extractor like lm-eval's ``regex`` filter followed by ``take_first``.

    Args:
        pattern: the regular expression; with several groups the first
            non-empty one of the selected match is used.
        select: which match to use (0 = first, -1 = last).

    Returns:
        A function from an output to the stripped match, or None if none.
    """
    compiled = re.compile(pattern)

    def extract(text: str) -> str | None:
        matches = compiled.findall(text)
        if not matches:
            return None
        match = matches[select]
        if isinstance(match, tuple):
            match = next((group for group in match if group), "")
        return match.strip() or None

    extract.__name__ = f"regex_extractor({pattern!r}, select={select})"
    return extract


gsm8k_strict = regex_extractor(GSM8K_STRICT, select=0)
gsm8k_flexible = regex_extractor(GSM8K_FLEXIBLE, select=-1)

_IGNORED = re.compile(r"[,$]")


def normalize_number(text: str) -> str:
    """GSM8K comparison form (lm-eval's ``regexes_to_ignore``): no ``,`` or ``$``,
    nothing up to ``#### ``, no trailing ``.``, case folded, stripped."""
    text = re.sub(r"(?s).*#### ", "", _IGNORED.sub("", text))
    return re.sub(r"\.$", "", text.strip()).strip().lower()


_REPEATED_SPAN = re.compile(r"(.{1,40}?)\1{7,}", re.DOTALL)


def is_degenerate(text: str, min_chars: int = 32) -> bool:
    """Whether an output is degenerate repetition.

    True when some span of 1-40 characters repeats back to back at least 8
    times and the run covers ``min_chars`` characters or more (``"the the the
    ..."``, ``"!!!!...``, a line repeated over and over), or when an output of
    at least 20 words uses fewer than one distinct word in five.
    """
    for match in _REPEATED_SPAN.finditer(text):
        if match.end() - match.start() >= min_chars:
            return True
    words = text.split()
    return len(words) >= 20 and len(set(words)) < len(words) / 5


# -- BIG-Bench Hard -----------------------------------------------------------------------------

BBH_ANSWER = r"(?<=the answer is )(.*)(?=.)"
"""lm-eval ``bbh_cot_fewshot`` ``get-answer``: after "the answer is ", up to the line's last character (first match)."""

bbh_cot_strict = regex_extractor(BBH_ANSWER, select=0)

_LAST_ANSWER = re.compile(r"the answer is (.+)", re.IGNORECASE)


def bbh_cot_flexible(text: str) -> str | None:
    """The last "the answer is X" (any case), X up to the end of its line without a final period.

    Catches what the strict pattern misses: a trailing space (``"(B). "``,
    read as ``"(B)."`` by lm-eval) or no final period (``"... is False"``,
    read as ``"Fals"``).
    """
    matches = _LAST_ANSWER.findall(text)
    if not matches:
        return None
    answer = matches[-1].strip()
    return answer.removesuffix(".").strip() or None


def whole_output(text: str) -> str | None:
    """The output itself, stripped of surrounding whitespace (None if empty)."""
    return text.strip() or None


# -- TriviaQA -----------------------------------------------------------------------------------


def first_answer(text: str) -> str | None:
    """lm-eval ``triviaqa`` filters ``remove_whitespace`` + ``take_first``: the output without leading whitespace."""
    return text.lstrip() or None


_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_exact_match(text: str) -> str:
    """lm-eval ``exact_match`` with ``ignore_case`` and ``ignore_punctuation``: lower case, ASCII punctuation removed.

    Whitespace is kept as it is, as lm-eval does.
    """
    return text.lower().translate(_PUNCTUATION)


_TRIVIAQA_PUNCTUATION = str.maketrans({ch: " " for ch in string.punctuation + "\u2018\u2019\u00b4`"})
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_triviaqa(text: str) -> str:
    """TriviaQA's own answer normalisation (its ``normalized_aliases``).

    Underscores and punctuation (with the quote marks ‘ ’ ´ `) become spaces,
    text is lower-cased, the articles a/an/the are dropped and whitespace is collapsed.
    """
    text = text.replace("_", " ").lower().translate(_TRIVIAQA_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


# -- lettered answers ---------------------------------------------------------------------------


def letter_extractor(pattern: str, select: int = 0) -> Callable[[str], str | None]:
    """Like :func:`regex_extractor` (case-insensitive), returning the match in upper case."""
    compiled = re.compile(pattern, re.IGNORECASE)

    def extract(text: str) -> str | None:
        matches = compiled.findall(text)
        return matches[select].strip().upper() or None if matches else None

    extract.__name__ = f"letter_extractor({pattern!r}, select={select})"
    return extract

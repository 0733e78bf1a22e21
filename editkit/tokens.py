"""Tokenisation rules shared by editors, edit metrics and the evaluation engine.

Two rules matter for correctness:

* Continuations are split as lm-evaluation-harness does: trailing whitespace of
  the context moves to the continuation, the pair is encoded whole, and the
  continuation's ids are what follows the context's own encoding. This keeps
  merges across the boundary identical to how the model sees the full text.
* The subject's last token is found by character offsets in the full text, so a
  subject repeated in a generated prefix, or merged with the next character, is
  still located at the occurrence the request means.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["encode", "encode_pair", "same_encoding", "target_text", "token_index_at_char", "subject_last_token"]

_PROBE = "The Colosseum is in Rome.\nQ: 2 + 2 = ? A: 4, naïve café"


def target_text(target: str) -> str:
    """The continuation for an edit target: the answer follows the prompt after a space."""
    return target if target.startswith(" ") else " " + target


def same_encoding(tokenizer: Any, other: Any) -> bool:
    """Whether two tokenizers encode a probe text (words, digits, a newline, accents) to the same ids."""
    return tokenizer is other or list(tokenizer(_PROBE)["input_ids"]) == list(other(_PROBE)["input_ids"])


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` with the tokenizer's default special tokens."""
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` and of ``continuation`` as the model sees them together.

    As lm-eval's ``_encode_pair``: trailing whitespace of the context moves to the
    continuation, and the continuation's ids are those of ``context + continuation``
    beyond the length of the context's ids. An empty context becomes the BOS token
    (EOS if there is none) and the continuation is encoded without special tokens.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [start], list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
    whole = encode(tokenizer, context + continuation)
    context_ids = encode(tokenizer, context)
    return context_ids, whole[len(context_ids):]


def token_index_at_char(tokenizer: Any, text: str, char_index: int) -> int:
    """Index of the token of ``tokenizer(text)`` that covers character ``char_index``."""
    if getattr(tokenizer, "is_fast", False):
        encoding = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        for index, (start, end) in enumerate(encoding["offset_mapping"]):
            if start <= char_index < end:
                return index
        raise ValueError(f"no token covers character {char_index} of {text!r}")
    # Slow tokenizers: the last token of the encoded prefix ending at that character.
    return len(encode(tokenizer, text[: char_index + 1])) - 1


def subject_last_token(tokenizer: Any, prefix: str, prompt: str, subject: str) -> tuple[str, int]:
    """Full text ``prefix + prompt`` and the index of the subject's last token in it.

    The subject is looked up in ``prompt`` (its first occurrence), never in ``prefix``.
    """
    start = prompt.find(subject)
    if start < 0:
        raise ValueError(f"subject {subject!r} does not occur in prompt {prompt!r}")
    text = prefix + prompt
    return text, token_index_at_char(tokenizer, text, len(prefix) + start + len(subject) - 1)


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[list[list[int]], list[list[int]]]:
    """Right-pad token lists; returns (ids, attention mask)."""
    width = max(len(s) for s in sequences)
    ids = [list(s) + [pad_id] * (width - len(s)) for s in sequences]
    mask = [[1] * len(s) + [0] * (width - len(s)) for s in sequences]
    return ids, mask

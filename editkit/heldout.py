"""Held-out natural text for the health alarm, and its overlap with the edit data.

The packaged prose is *Botchan* (Natsume Soseki, English translation 1919; public domain
in the US), taken from the ``sentencepiece`` 0.2.3 source archive on PyPI by
``scripts/package_heldout.py``; ``editkit/data/heldout/README.md`` gives its provenance,
license and digest. :func:`heldout_texts` cuts it into fixed chunks (or, with
``source="wikitext"``, the hub's WikiText-2 test split where the hub is reachable), and
:func:`edit_overlap` shows that no edit prompt occurs in it. Nothing is read at import time.
"""

from __future__ import annotations

import hashlib
import logging
import lzma
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from .resources import ChecksumError, data_root
from .types import EditRequest

__all__ = ["HELDOUT_FILE", "HELDOUT_SHA256", "heldout_paragraphs", "heldout_texts", "chunk_paragraphs",
           "EditOverlap", "edit_overlap"]

log = logging.getLogger(__name__)

HELDOUT_FILE = "heldout/botchan.txt"
"""The packaged held-out text (stored as ``.xz``): paragraphs separated by one blank line."""
HELDOUT_SHA256 = "52be1d59b0543242032728aa5a18046d97af7aa0066f375b0b322e5542da08de"
"""SHA-256 of the uncompressed held-out text, as ``scripts/package_heldout.py`` wrote it."""

_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"'])\s+")


def heldout_paragraphs(source: Literal["packaged", "wikitext"] = "packaged") -> list[str]:
    """Paragraphs of the held-out prose, in order.

    Args:
        source: ``"packaged"`` reads the text shipped in editkit (its SHA-256 is checked);
            ``"wikitext"`` loads WikiText-2 (raw) test through
            ``datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")`` and keeps
            its non-empty lines that are not ``= Heading =`` lines. That needs the ``datasets``
            package and the Hugging Face hub; it cannot run offline and is not tested here.

    Raises:
        ChecksumError: the packaged file does not match :data:`HELDOUT_SHA256`.
        ImportError: ``source="wikitext"`` without the ``datasets`` package.
        ValueError: an unknown ``source``.
    """
    if source == "packaged":
        data = lzma.decompress((data_root() / f"{HELDOUT_FILE}.xz").read_bytes())
        if hashlib.sha256(data).hexdigest() != HELDOUT_SHA256:
            raise ChecksumError(f"packaged file {HELDOUT_FILE!r} does not match editkit.health.HELDOUT_SHA256")
        return data.decode("utf-8").strip().split("\n\n")
    if source == "wikitext":
        try:
            import datasets
        except ImportError as error:
            raise ImportError("heldout_paragraphs(source='wikitext') needs the `datasets` package "
                              "(pip install datasets) and access to the Hugging Face hub") from error
        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
        lines = (row.strip() for row in rows)
        return [line for line in lines if line and not (line.startswith("=") and line.endswith("="))]
    raise ValueError(f"unknown held-out source {source!r} (known: 'packaged', 'wikitext')")


def chunk_paragraphs(paragraphs: Sequence[str], chunk_words: int) -> list[str]:
    """Consecutive ``paragraphs`` packed greedily into chunks of at most ``chunk_words`` words.

    Paragraphs inside a chunk stay separated by a blank line. A paragraph longer than
    ``chunk_words`` is cut between sentences, and a sentence longer than that between words,
    so no chunk exceeds the limit and the text's order is kept.
    """
    if chunk_words < 1:
        raise ValueError(f"chunk_words must be positive, got {chunk_words}")
    chunks: list[str] = []
    size, last = chunk_words + 1, -1  # words in the current chunk, paragraph of its last piece
    for index, paragraph in enumerate(paragraphs):
        sentences = [paragraph] if len(paragraph.split()) <= chunk_words else _SENTENCE_BREAK.split(paragraph)
        for sentence in sentences:
            words = sentence.split()
            for piece in (words[at:at + chunk_words] for at in range(0, len(words), chunk_words)):
                if size + len(piece) > chunk_words:
                    chunks.append(" ".join(piece))
                    size = len(piece)
                else:
                    chunks[-1] += (" " if index == last else "\n\n") + " ".join(piece)
                    size += len(piece)
                last = index
    return chunks


def heldout_texts(source: Literal["packaged", "wikitext"] = "packaged", n_chunks: int | None = 32,
                  chunk_words: int = 150) -> list[str]:
    """A fixed, deterministic set of held-out texts for :func:`perplexity`.

    The prose (:func:`heldout_paragraphs`) is cut into chunks of at most ``chunk_words``
    words (:func:`chunk_paragraphs`; 150 words are about 200 SmolLM2 tokens, under the
    default ``max_length=256`` of :func:`score_texts`) and ``n_chunks`` of them are taken
    evenly spaced from start to end (chunk ``i * total // n_chunks``), so the sample covers
    the whole text. The packaged text gives 367 chunks of 150 words.

    Args:
        source: see :func:`heldout_paragraphs` (``"wikitext"`` needs the hub).
        n_chunks: how many chunks; None takes every chunk.
        chunk_words: the most words in one chunk.

    Raises:
        ValueError: ``n_chunks`` is not positive or exceeds the number of chunks.
    """
    chunks = chunk_paragraphs(heldout_paragraphs(source), chunk_words)
    if n_chunks is None:
        return chunks
    if not 1 <= n_chunks <= len(chunks):
        raise ValueError(f"n_chunks must be between 1 and {len(chunks)} for chunk_words={chunk_words}, got {n_chunks}")
    return [chunks[i * len(chunks) // n_chunks] for i in range(n_chunks)]


@dataclass(frozen=True)
class EditOverlap:
    """Edit data that occurs verbatim (case-sensitive) in a text (:func:`edit_overlap`).

    Attributes:
        n_requests: requests checked.
        subjects: distinct subjects of at least ``min_subject_length`` characters found, sorted.
        prompts: distinct edit and rephrase prompts found, sorted.
        locality_prompts: distinct locality prompts found, sorted.
    """

    n_requests: int
    subjects: tuple[str, ...]
    prompts: tuple[str, ...]
    locality_prompts: tuple[str, ...]


def _occurs(needle: str, text: str, words: set[str]) -> bool:
    # A needle's inner whitespace-separated tokens are whole tokens of the text wherever it
    # occurs, so a set lookup rules out most needles before the substring search.
    inner = needle.split()[1:-1]
    return all(token in words for token in inner) and needle in text


def edit_overlap(requests: Iterable[EditRequest], text: str | None = None, min_subject_length: int = 12) -> EditOverlap:
    """Subjects and prompts of ``requests`` that occur verbatim in ``text`` (None: the packaged held-out text)."""
    text = "\n\n".join(heldout_paragraphs()) if text is None else text
    words = set(text.split())
    found: dict[str, set[str]] = {"subjects": set(), "prompts": set(), "locality_prompts": set()}
    n_requests = 0
    for request in requests:
        n_requests += 1
        if len(request.subject) >= min_subject_length and _occurs(request.subject, text, words):
            found["subjects"].add(request.subject)
        for kind, prompts in (("prompts", (request.prompt, *request.rephrase_prompts)),
                              ("locality_prompts", request.locality_prompts)):
            found[kind].update(p for p in prompts if p.strip() and _occurs(p, text, words))
    return EditOverlap(n_requests, *(tuple(sorted(found[kind])) for kind in found))

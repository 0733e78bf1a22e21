"""The types the benchmark modules share, so that none of them imports the engine.

* lm-evaluation-harness's model API as far as editkit's tasks need it:
  :class:`LanguageModel`, its requests (:class:`GenerationRequest`) and the
  richer score of one continuation (:class:`ContinuationScore`);
* :class:`ModelRunner`: the part of :class:`~editkit.benchmarks.engine.Engine`
  that :mod:`.passes` and :mod:`.generation` use to run batches (the model, the
  tokenizer, padding and one forward pass).

Dependencies point one way: ``engine`` -> ``generation`` -> ``passes`` -> ``api``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["ContinuationScore", "GenerationRequest", "LanguageModel", "ModelRunner"]


@dataclass(frozen=True)
class ContinuationScore:
    """How a model scores one continuation of one context.

    Attributes:
        logprob: sum of the continuation tokens' log-probabilities (nan if any
            logit was non-finite).
        is_greedy: every continuation token is the argmax at its position.
        n_tokens: number of continuation tokens.
        n_chars: ``len(continuation)`` in characters (for ``acc_norm``).
        token_logprobs: log-probability of each continuation token.
        target_tokens: the continuation's token ids.
        greedy_tokens: the argmax token id at each continuation position.
        finite: False if any logit used was NaN or infinite.
    """

    logprob: float
    is_greedy: bool
    n_tokens: int
    n_chars: int
    token_logprobs: tuple[float, ...]
    target_tokens: tuple[int, ...]
    greedy_tokens: tuple[int, ...]
    finite: bool


@dataclass(frozen=True)
class GenerationRequest:
    """A greedy generation: stop at any string of ``until``, at EOS, or after ``max_new_tokens``."""

    context: str
    until: tuple[str, ...] = ()
    max_new_tokens: int = 256


@runtime_checkable
class LanguageModel(Protocol):
    """lm-evaluation-harness's model API, as far as editkit's tasks need it."""

    name: str

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """``(log P(continuation | context), is_greedy)`` for each ``(context, continuation)``."""
        ...

    def generate_until(self, requests: Sequence[GenerationRequest]) -> list[str]:
        """The greedy continuation of each request, cut before its first stop string."""
        ...


class ModelRunner(Protocol):
    """What batched forward passes and decoding need from the engine.

    Attributes:
        model: the Hugging Face causal LM (its ``config`` is read for the sliding window).
        tokenizer: its tokenizer (generation decodes with it).
        eos_token_ids: token ids that end a generation.
        share_prefix: run a token prefix common to a batch once.
        min_shared_prefix: the shortest prefix worth sharing, in tokens.
    """

    model: Any
    tokenizer: Any
    eos_token_ids: frozenset[int]
    share_prefix: bool
    min_shared_prefix: int

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters."""
        ...

    def pad(self, sequences: Sequence[Sequence[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids and attention mask of ``sequences`` padded on the ``"left"`` or ``"right"``."""
        ...

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, *,
                keep: int | torch.Tensor | None = None, past_key_values: object = None,
                use_cache: bool = False) -> Any:
        """One forward pass; ``keep`` limits the columns whose logits are computed."""
        ...

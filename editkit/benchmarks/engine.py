"""The one piece of benchmark code that runs the model.

:class:`Engine` implements lm-evaluation-harness's model API over a
:class:`~editkit.models.LoadedModel`: ``loglikelihood`` (and the richer
:meth:`Engine.score`) for choice tasks and ``generate_until`` for generation
tasks. Tasks never touch the model; a scripted fake implementing
:class:`LanguageModel` can stand in for the engine in tests.

Tokenisation follows lm-eval's ``_encode_pair``: trailing whitespace of the
context moves to the front of the continuation, ``context + continuation`` and
``context`` are encoded whole with the tokenizer's default special tokens, and
the continuation ids are the tail of the first beyond the length of the second.
An empty context is replaced by the BOS token (EOS when there is none).

Batching and exactness. Requests are grouped by context; batches of contexts
run as described in :mod:`.passes` (left padding with explicit position ids, or
a shared few-shot prefix run once), giving the logits after each context's last
token. The remaining continuation tokens of every request then run,
right-padded, on top of a per-row copy of that key/value cache, with logits for
those few positions only. So the four one-token answers of a lettered
multiple-choice item cost one pass over its prompt, and the answer texts of a
cloze item reuse it. Batched scores equal one-at-a-time scores to float
round-off (checked in the tests on GPT-2, Llama, Gemma 3 and SmolLM2).

Batches are formed from contexts sorted by length (longest first, within each
set of contexts sharing a few-shot prefix), so a batch too large for memory
fails at once, and a batch ends before a row that would bring much padding
(see :func:`.passes.plan_batches`). ``batch_size="auto"`` picks the
largest batch whose estimated memory fits a cap (see
:func:`.passes.auto_batch_size`): by default 80% of the free GPU memory, or
half of the available system memory on CPU.
"""

from __future__ import annotations

import inspect
import logging
import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from ..kv_cache import select_rows
from ..routing import target_lm, unrouted
from ..tokens import encode_pair, same_encoding
from .api import ContinuationScore, GenerationRequest, LanguageModel
from .generation import greedy_generate
from .passes import PrefixMemo, auto_batch_size, memory_budget, plan_batches, run_contexts

if TYPE_CHECKING:
    from ..models import LoadedModel

# ContinuationScore, GenerationRequest and LanguageModel live in .api; re-exported for existing imports.
__all__ = ["ContinuationScore", "GenerationRequest", "LanguageModel", "Engine"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Encoded:
    index: int
    context: tuple[int, ...]
    continuation: tuple[int, ...]
    n_chars: int


def _max_positions(config: object) -> int:
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Engine:
    """Runs a :class:`~editkit.models.LoadedModel` for the benchmarks (implements :class:`LanguageModel`).

    Args:
        lm: the loaded model; it is only read, never changed.
        batch_size: the most sequences in one forward pass, or ``"auto"``: per
            call, the largest batch whose estimated memory fits ``memory_cap``
            (at most ``max_batch_size``).
        max_length: the longest input in tokens; longer inputs lose tokens on
            the left. Default: the model's maximum number of positions.
        progress: show tqdm progress bars.
        memory_cap: bytes that ``"auto"`` may plan for; default
            :func:`~editkit.benchmarks.passes.memory_budget` of the model's device.
        max_batch_size: the largest batch ``"auto"`` chooses.

    Attributes:
        share_context: score requests that share a context on one pass over it.
        share_prefix: run a token prefix common to a batch of contexts once
            (see :mod:`.passes`).
        min_shared_prefix: the shortest prefix worth sharing, in tokens.
        last_batch_size: the batch size the latest call used.

    The sharing switches exist to measure what they save; results do not
    depend on them beyond float round-off.
    """

    share_context: bool = True
    share_prefix: bool = True
    min_shared_prefix: int = 16

    def __init__(
        self, lm: LoadedModel, batch_size: int | str = 8, max_length: int | None = None, progress: bool = True, *,
        memory_cap: int | None = None, max_batch_size: int = 64,
    ) -> None:
        if batch_size != "auto" and (not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool)
                                     or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be positive, got {max_batch_size}")
        if memory_cap is not None and memory_cap < 1:
            raise ValueError(f"memory_cap must be a positive number of bytes, got {memory_cap}")
        self.lm = lm
        self.model = lm.model
        self.tokenizer = lm.tokenizer
        self.name = lm.name
        self.batch_size = batch_size
        self.memory_cap = memory_cap
        self.max_batch_size = max_batch_size
        self.last_batch_size: int | None = None
        self.max_length = max_length or _max_positions(self.model.config)
        self.progress = progress
        tokenizer = self.tokenizer
        self.prefix_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.prefix_token_id
        self.eos_token_ids = self._eos_ids()
        self._has_logits_to_keep = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self._delegates: dict[int, Engine] = {}

    def resolve_batch_size(self, length: int, logit_positions: int = 1) -> int:
        """The batch size for sequences of up to ``length`` tokens (``batch_size`` itself unless ``"auto"``).

        Args:
            length: tokens in the longest sequence, appended tokens included.
            logit_positions: positions per sequence whose logits are computed.
        """
        if self.batch_size != "auto":
            size = int(self.batch_size)
        else:
            cap = self.memory_cap if self.memory_cap is not None else memory_budget(self.device)
            element_size = next(self.model.parameters()).element_size()
            size = auto_batch_size(self.model.config, element_size, length, logit_positions, cap,
                                   self.max_batch_size)
        self.last_batch_size = size
        return size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _eos_ids(self) -> frozenset[int]:
        ids = {self.tokenizer.eos_token_id}
        generation_config = getattr(self.model, "generation_config", None)
        configured = getattr(generation_config, "eos_token_id", None)
        ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
        return frozenset(i for i in ids if i is not None)

    # -- tokenisation -------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with the tokenizer's default special tokens."""
        return list(self.tokenizer(text)["input_ids"])

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids, as lm-eval's ``_encode_pair``.

        Trailing whitespace of the context moves to the continuation; the
        continuation ids are those of ``context + continuation`` beyond the
        length of ``context``'s ids. An empty context becomes the BOS token
        (EOS if the tokenizer has no BOS) and the continuation is then encoded
        without special tokens.
        """
        return encode_pair(self.tokenizer, context, continuation)

    def _encode_request(self, index: int, context: str, continuation: str) -> _Encoded:
        context_ids, continuation_ids = self.encode_pair(context, continuation)
        return self._fit(index, context_ids, continuation_ids, len(continuation))

    def _fit(self, index: int, context_ids: Sequence[int], continuation_ids: Sequence[int], n_chars: int) -> _Encoded:
        if len(continuation_ids) > self.max_length:
            raise ValueError(
                f"request {index}: the continuation has {len(continuation_ids)} tokens, more than "
                f"max_length={self.max_length}"
            )
        # lm-eval keeps the last max_length + 1 tokens (the last one is only a target): cut the context.
        overflow = len(context_ids) + len(continuation_ids) - (self.max_length + 1)
        if overflow > 0:
            context_ids = context_ids[overflow:]
        return _Encoded(index, tuple(context_ids), tuple(continuation_ids), n_chars)

    # -- forward passes -----------------------------------------------------------------------

    def pad(self, sequences: Sequence[Sequence[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids and attention mask of ``sequences`` padded on the ``"left"`` or ``"right"``, on the model's device."""
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            if seq:
                columns = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
                ids[row, columns] = torch.tensor(seq, dtype=torch.long)
                mask[row, columns] = 1
        return ids.to(self.device), mask.to(self.device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, *,
                keep: int | torch.Tensor | None = None, past_key_values: object = None,
                use_cache: bool = False) -> object:
        """One forward pass of the model.

        Args:
            keep: compute logits only for the last ``keep`` columns (an int) or
                for the given column indices (a tensor); None for all columns.
        """
        kwargs: dict[str, object] = {}
        if keep is not None and self._has_logits_to_keep:
            kwargs["logits_to_keep"] = keep
        with unrouted(self.lm):  # contexts were routed as text (route()); the forward hook must not route again
            output = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                past_key_values=past_key_values, use_cache=use_cache, **kwargs)
        if keep is not None and not self._has_logits_to_keep:
            output.logits = output.logits[:, -keep:] if isinstance(keep, int) else output.logits[:, keep]
        return output

    def route(self, contexts: Sequence[str]) -> list[str]:
        """``contexts`` after the model's context routers (see :class:`~editkit.models.LoadedModel`)."""
        contexts = list(contexts)
        for router in getattr(self.lm, "context_routers", ()):
            contexts = list(router.route(contexts))
        return contexts

    def for_text(self, routed: str) -> Engine:
        """The engine that reads a routed context: this one, or one over the model a
        :class:`~editkit.routing.Delegated` text names (SERAC's counterfactual model), same settings.

        Raises:
            ValueError: that model's tokenizer encodes text differently from this one's.
        """
        lm = target_lm(routed, self.lm)
        if lm is self.lm:
            return self
        if id(lm) not in self._delegates:
            if not same_encoding(lm.tokenizer, self.tokenizer):
                raise ValueError(f"{lm.name!r} answers routed contexts of {self.name!r} but does not share its "
                                 "tokenizer; scores would not be comparable")
            self._delegates[id(lm)] = Engine(lm, self.batch_size, self.max_length, progress=False,
                                             memory_cap=self.memory_cap, max_batch_size=self.max_batch_size)
        return self._delegates[id(lm)]

    def by_engine(self, routed: Sequence[str]) -> list[tuple[Engine, list[int]]]:
        """The positions of ``routed`` grouped by the engine that reads them (this one first)."""
        groups: dict[int, tuple[Engine, list[int]]] = {id(self): (self, [])}
        for i, text in enumerate(routed):
            engine = self.for_text(text)
            groups.setdefault(id(engine), (engine, []))[1].append(i)
        return [group for group in groups.values() if group[1]]

    def score(self, requests: Sequence[tuple[str, str]]) -> list[ContinuationScore]:
        """Score each ``(context, continuation)``; results in request order."""
        contexts = self.route([context for context, _ in requests])
        results: list[ContinuationScore | None] = [None] * len(requests)
        for engine, positions in self.by_engine(contexts):
            scored = engine._score_encoded([engine._encode_request(j, str(contexts[i]), requests[i][1])
                                            for j, i in enumerate(positions)])
            for i, score in zip(positions, scored):
                results[i] = score
        return results  # type: ignore[return-value]

    def score_tokens(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[ContinuationScore]:
        """Score each ``(context ids, continuation ids)`` (lm-eval's ``_loglikelihood_tokens``); in request order.

        The token-level entry behind ``loglikelihood_rolling`` windows
        (:mod:`editkit.lm_eval_bridge`). Context routers are not applied: they
        rewrite text, so a caller routes before it tokenizes. Every context needs
        at least one token; one too long loses tokens on the left, as in :meth:`score`.
        """
        if any(not context for context, _ in requests):
            raise ValueError("score_tokens needs at least one context token per request (e.g. the BOS token)")
        return self._score_encoded([self._fit(i, context, continuation, len(self.tokenizer.decode(continuation)))
                                    for i, (context, continuation) in enumerate(requests)])

    def _score_encoded(self, encoded: Sequence[_Encoded]) -> list[ContinuationScore]:
        results: list[ContinuationScore | None] = [None] * len(encoded)
        groups: dict[tuple, list[_Encoded]] = {}
        for request in encoded:
            if not request.continuation:
                results[request.index] = ContinuationScore(0.0, True, 0, request.n_chars, (), (), (), True)
                continue
            key = request.context if self.share_context else (request.context, request.index)
            groups.setdefault(key, []).append(request)
        keyed = list(groups.values())
        longest = max((len(r.context) + len(r.continuation) for group in keyed for r in group), default=1)
        widest = max((len(r.continuation) for group in keyed for r in group), default=1)
        size = self.resolve_batch_size(longest, widest)
        plan = plan_batches([group[0].context for group in keyed], size)
        memo = PrefixMemo()
        with torch.inference_mode(), tqdm(total=len(encoded), disable=not self.progress, desc="loglikelihood") as bar:
            bar.update(len(encoded) - sum(len(group) for group in keyed))
            for members, shared in plan:
                batch = [keyed[i] for i in members]
                scored = self._halving_on_oom(lambda part: self._score_batch(part, shared, memo, size), batch)
                for score, request in scored:
                    results[request.index] = score
                bar.update(sum(len(group) for group in batch))
        return results  # type: ignore[return-value]

    def _score_batch(self, groups: Sequence[list[_Encoded]], shared: int, memo: PrefixMemo, size: int
                     ) -> list[tuple[ContinuationScore, _Encoded]]:
        # Continuations of more than one token run on top of their context's cache, longest first.
        longer = [(row, request) for row, group in enumerate(groups) for request in group if len(request.continuation) > 1]
        longer.sort(key=lambda pair: -len(pair[1].continuation))
        tail_width = max((len(request.continuation) - 1 for _, request in longer), default=0)
        contexts = [group[0].context for group in groups]
        state = run_contexts(self, contexts, shared, tail_width, memo, use_cache=bool(longer))
        first = state.logits.float()
        first_finite = torch.isfinite(first).all(-1).tolist()
        first_logprobs = first.log_softmax(-1)
        first_greedy = first.argmax(-1).tolist()
        # Per request: (logprob, greedy token, finite) for each continuation token.
        steps: dict[int, list[tuple[float, int, bool]]] = {}
        for row, group in enumerate(groups):
            for request in group:
                token = request.continuation[0]
                steps[request.index] = [(first_logprobs[row, token].item(), first_greedy[row], first_finite[row])]
        for chunk in _chunks(longer, size):
            rows = torch.tensor([row for row, _ in chunk], device=self.device)
            tail_ids, tail_mask = self.pad([request.continuation[:-1] for _, request in chunk], side="right")
            tail_positions = state.lengths[rows, None] + torch.arange(tail_ids.shape[1], device=self.device)
            # Right padding of short tails runs past the last real position; those columns are masked,
            # but absolute position tables (GPT-2) must still be indexable.
            tail_positions = tail_positions.clamp(max=self.max_length - 1)
            tail_out = self.forward(tail_ids, torch.cat([state.mask[rows], tail_mask], dim=1), tail_positions,
                                    past_key_values=select_rows(state.cache, rows), use_cache=True)
            logits = tail_out.logits.float()
            finite = torch.isfinite(logits).all(-1)
            logprobs = logits.log_softmax(-1)
            greedy = logits.argmax(-1)
            for k, (_, request) in enumerate(chunk):
                targets = torch.tensor(request.continuation[1:], device=self.device)
                n = len(targets)
                token_lp = logprobs[k, torch.arange(n, device=self.device), targets].tolist()
                steps[request.index] += list(zip(token_lp, greedy[k, :n].tolist(), finite[k, :n].tolist()))
            del tail_out, logits, logprobs
        return [(self._assemble(request, steps[request.index]), request) for group in groups for request in group]

    def _halving_on_oom(self, run: Callable[[list], list], batch: Sequence) -> list:
        """``run(batch)``; with ``batch_size="auto"``, a batch that runs out of device memory runs as two halves.

        The memory estimate behind ``"auto"`` is pessimistic, but another process on
        the same GPU can still take memory between the estimate and the pass. Each
        halving is logged and lowers ``max_batch_size`` for later calls. A fixed
        batch size, or a single sequence that does not fit, raises the error.
        """
        try:
            return run(list(batch))
        except torch.OutOfMemoryError:
            if self.batch_size != "auto" or len(batch) < 2:
                raise
        empty_cache = getattr(getattr(torch, self.device.type, None), "empty_cache", None)
        if empty_cache is not None:
            empty_cache()
        half = len(batch) // 2
        self.max_batch_size = max(1, min(self.max_batch_size, half))
        log.warning("out of device memory with %d sequences in a batch: running %d and %d (max_batch_size now %d)",
                    len(batch), half, len(batch) - half, self.max_batch_size)
        return self._halving_on_oom(run, batch[:half]) + self._halving_on_oom(run, batch[half:])

    @staticmethod
    def _assemble(request: _Encoded, steps: list[tuple[float, int, bool]]) -> ContinuationScore:
        token_lp, greedy_ids, finite_flags = zip(*steps)
        finite = all(finite_flags)
        return ContinuationScore(
            logprob=math.fsum(token_lp) if finite else math.nan,
            is_greedy=finite and tuple(greedy_ids) == request.continuation,
            n_tokens=len(request.continuation),
            n_chars=request.n_chars,
            token_logprobs=tuple(token_lp),
            target_tokens=request.continuation,
            greedy_tokens=tuple(greedy_ids),
            finite=finite,
        )

    # -- lm-eval API --------------------------------------------------------------------------

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """``(log P(continuation | context), is_greedy)`` per request (lm-eval's ``loglikelihood``)."""
        return [(score.logprob, score.is_greedy) for score in self.score(requests)]

    def generate_until(self, requests: Sequence[GenerationRequest]) -> list[str]:
        """Greedy continuations, cut before the first stop string (lm-eval's ``generate_until``).

        A generation stops at any string of its ``until``, at an EOS token, or
        after ``max_new_tokens`` tokens. A generation that meets non-finite
        logits returns ``""`` and is logged. Batched equals unbatched.
        """
        routed = self.route([r.context for r in requests])
        outputs = [""] * len(requests)
        for engine, positions in self.by_engine(routed):
            texts = engine._generate_routed([str(routed[i]) for i in positions], [requests[i] for i in positions])
            for i, text in zip(positions, texts):
                outputs[i] = text
        return outputs

    def _generate_routed(self, routed: Sequence[str], requests: Sequence[GenerationRequest]) -> list[str]:
        contexts = []
        for index, (text, request) in enumerate(zip(routed, requests)):
            ids = self.encode(text) if text else [self.prefix_token_id]
            room = max(self.max_length - request.max_new_tokens, 1)
            if len(ids) > room:
                log.debug("request %d: context cut from %d to %d tokens on the left", index, len(ids), room)
                ids = ids[-room:]
            contexts.append(ids)
        outputs = [""] * len(requests)
        memo = PrefixMemo()
        longest = max((len(ids) + r.max_new_tokens for ids, r in zip(contexts, requests)), default=1)
        size = self.resolve_batch_size(longest)
        with torch.inference_mode(), tqdm(total=len(requests), disable=not self.progress, desc="generate") as bar:
            for batch, shared in plan_batches(contexts, size):
                texts = self._halving_on_oom(lambda part: greedy_generate(
                    self, [contexts[i] for i in part], [requests[i] for i in part], shared, memo), batch)
                for i, text in zip(batch, texts):
                    if text is None:
                        log.warning("generation %d met non-finite logits; returning an empty string", i)
                        text = ""
                    outputs[i] = text
                bar.update(len(batch))
        return outputs

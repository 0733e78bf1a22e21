"""Batched greedy decoding with per-row stop strings (used by :class:`~editkit.benchmarks.engine.Engine`).

Contexts run as in :mod:`.passes` (left padding or a shared prefix, explicit
``position_ids``), then decode one token per step with the key/value cache.
Each row stops on its own (stop string, EOS, token budget, or non-finite
logits) and is then dropped from the batch, so the others carry on exactly as
they would alone (batched output equals unbatched output), and the loop ends
as soon as every row has stopped.

The text of a row is its generated tokens decoded without special tokens and
cut before the earliest stop string, as lm-eval's ``HFLM.generate_until``
returns it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .api import GenerationRequest, ModelRunner
from .passes import PrefixMemo, run_contexts

__all__ = ["greedy_generate", "cut_at_stop"]


def cut_at_stop(text: str, until: Sequence[str]) -> tuple[str, bool]:
    """``text`` cut before the earliest occurrence of any non-empty stop string, and whether one occurred."""
    cut = min((found for stop in until if stop and (found := text.find(stop)) >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def greedy_generate(
    engine: ModelRunner, contexts: Sequence[Sequence[int]], requests: Sequence[GenerationRequest], shared: int,
    memo: PrefixMemo
) -> list[str | None]:
    """Greedy continuations of one batch of tokenised contexts.

    Args:
        engine: supplies the model, tokenizer, padding and EOS ids.
        contexts: token ids of each context (already truncated to fit).
        requests: the matching requests (stop strings, token budgets).
        shared: length of a prefix common to every context (see :func:`.passes.plan_batches`).
        memo: the shared prefix of an earlier batch in the same call.

    Returns:
        The generated text of each row cut before its first stop string, or
        None for a row that met non-finite logits.
    """
    tokenizer = engine.tokenizer
    state = run_contexts(engine, contexts, shared, max(r.max_new_tokens for r in requests), memo)
    cache, mask, logits, next_positions = state.cache, state.mask, state.logits, state.lengths
    generated: list[list[int]] = [[] for _ in contexts]
    texts: list[str | None] = [""] * len(contexts)
    active = list(range(len(contexts)))  # batch row k holds request active[k]
    while active:
        finite = torch.isfinite(logits).all(-1).tolist()
        tokens = logits.argmax(-1)
        keep = []
        for k, (row, token) in enumerate(zip(active, tokens.tolist())):
            request = requests[row]
            if not finite[k]:
                texts[row] = None
                continue
            if token in engine.eos_token_ids or request.max_new_tokens <= 0:
                continue
            generated[row].append(token)
            texts[row], stopped = cut_at_stop(tokenizer.decode(generated[row], skip_special_tokens=True),
                                              request.until)
            if stopped or len(generated[row]) >= request.max_new_tokens:
                continue
            keep.append(k)
        if not keep:
            break
        if len(keep) < len(active):  # drop finished rows from every batched tensor and the cache
            index = torch.tensor(keep, device=mask.device)
            cache.batch_select_indices(index)
            mask, tokens, next_positions = mask[index], tokens[index], next_positions[index]
            active = [active[k] for k in keep]
        mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
        output = engine.forward(tokens[:, None], mask, next_positions[:, None], keep=1,
                                past_key_values=cache, use_cache=True)
        logits = output.logits[:, -1]
        next_positions = next_positions + 1
    return texts

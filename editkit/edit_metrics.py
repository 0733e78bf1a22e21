"""Edit quality: reliability, generalisation and locality, in three conventions.

Conventions (report which one a number uses; the result frames name it in a
``convention`` column):

``prob`` (ROME, Meng et al. 2022)
    reliability / generalisation: the new target is more likely than the true one,
    comparing mean per-token log-probabilities (ROME's efficacy and paraphrase
    scores); locality: on a neighbourhood prompt the edited model prefers the
    locality answer over the new target exactly when the *unedited* model did.
``token`` (EasyEdit)
    reliability / generalisation: teacher-forced accuracy of the new target's
    tokens; locality: the fraction of the locality answer's teacher-forced
    positions where the edited model's argmax equals the unedited model's.
``gen`` (Yang et al. 2025, "The Mirage of Model Editing", ACL 2025, arXiv:2502.11177)
    Teacher forcing feeds the model the gold prefix of the target, leaking its
    content and length, so a model that would never *say* the target on its
    own can still score 1 under ``token`` (and ``prob`` only compares two fixed
    strings): both overstate what an edit does when the model is used (the
    paper measures 38.5% against the reported 96.8%). ``gen`` judges what the
    model actually generates. reliability / generalisation: the greedy continuation
    of the edit prompt (each rephrase prompt) contains the new target, as whole
    words after :func:`normalize_text`; locality: the edited model's normalised
    greedy continuation of a locality prompt equals the unedited model's.

    Budget: a continuation runs for at most ``n + GEN_SLACK_TOKENS`` tokens, ``n``
    being the target's (for locality: the locality answer's) token count as the
    engine encodes it after the prompt, and stops at a newline. The slack lets a
    short preamble (an article, "the city of") come before the answer without
    rewarding a long ramble that mentions it by chance. Locality uses the same
    budget for the unedited and the edited model, so the comparison is exact.
    Deviation: the paper's WILD evaluation generates up to a natural stop; a
    budget tied to the answer's length still leaks that length a little, but
    keeps the cost of evaluating thousands of prompts per checkpoint bounded.

    A generation that fails (the engine met non-finite logits: ``None``, or
    ``""`` from :class:`~editkit.benchmarks.Engine` with a non-finite score of
    the same prompt) counts as not containing the target and as not matching
    the reference.

Locality always compares with the unedited model: :func:`locality_reference`
records its answers once, before any edit. All scoring goes through the
evaluation engine (:class:`editkit.benchmarks.Engine`), batched over every
prompt of every request: one ``score`` call and one ``generate_until`` call.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .benchmarks.api import GenerationRequest
from .benchmarks.engine import ContinuationScore, Engine
from .benchmarks.metrics import bootstrap_means
from .tokens import target_text
from .types import EditRequest

if TYPE_CHECKING:
    from .models import LoadedModel

__all__ = ["locality_reference", "edit_quality", "summarize_quality", "normalize_text", "contains_answer",
           "METRICS", "CONVENTIONS", "GEN_SLACK_TOKENS", "GEN_STOP"]

METRICS = ("reliability", "generalization", "locality")
CONVENTIONS = ("prob", "token", "gen")
# Tokens a ``gen`` continuation may run beyond the answer's own length (see the module docstring).
GEN_SLACK_TOKENS = 8
# ``gen`` continuations stop at the end of the line, as the checkpoint probes do.
GEN_STOP = ("\n",)


def _engine(lm_or_engine: LoadedModel | Engine, batch_size: int = 16) -> Engine:
    return lm_or_engine if isinstance(lm_or_engine, Engine) else Engine(lm_or_engine, batch_size, progress=False)


def _mean_logprob(score: ContinuationScore) -> float:
    return score.logprob / max(score.n_tokens, 1)


def _token_accuracy(score: ContinuationScore) -> float:
    return float(np.mean([g == t for g, t in zip(score.greedy_tokens, score.target_tokens)]))


def _mean(values: Sequence[float]) -> float:
    """Mean of the non-NaN ``values``; NaN when there are none."""
    kept = [v for v in values if not np.isnan(v)]
    return float(np.mean(kept)) if kept else np.nan


def normalize_text(text: str) -> str:
    """``text`` for answer matching: NFKC, lower-case, punctuation as spaces, whitespace collapsed and stripped.

    Punctuation is every Unicode ``P*`` character, so ``"Paris."`` becomes
    ``"paris"`` and ``"Jean-Paul"`` becomes ``"jean paul"``. Idempotent.
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    return " ".join(text.split())


def contains_answer(continuation: str | None, target: str) -> float:
    """1.0 if normalised ``target`` occurs as whole words in normalised ``continuation``, else 0.0.

    Whole words: ``"New York"`` is in ``"new york city"`` but not in ``"New
    Yorker"``. A failed generation (``None``) contains nothing (0.0); a target
    with no words after normalisation cannot be judged (NaN).
    """
    wanted = normalize_text(target)
    if not wanted:
        return np.nan
    if continuation is None:
        return 0.0
    return float(f" {wanted} " in f" {normalize_text(continuation)} ")


def _generation_request(engine: Engine, prompt: str, answer: str) -> GenerationRequest:
    """Greedy generation of ``prompt`` for the answer's token count plus :data:`GEN_SLACK_TOKENS`."""
    _, answer_ids = engine.encode_pair(prompt, target_text(answer))
    return GenerationRequest(prompt, GEN_STOP, len(answer_ids) + GEN_SLACK_TOKENS)


def _generated(text: str | None, score: ContinuationScore) -> str | None:
    """The normalised continuation, or None for a failed generation.

    The engine returns ``""`` both for an empty continuation and for one that met
    non-finite logits; ``score`` (the locality answer scored after the same
    prompt) tells them apart when the very first logits were non-finite, which
    is what a broken model gives.
    """
    if text is None or (not text and not score.finite):
        return None
    return normalize_text(text)


def locality_reference(lm_or_engine: LoadedModel | Engine, requests: Sequence[EditRequest],
                       generate: bool = True) -> list[list[dict[str, Any] | None]]:
    """The unedited model's behaviour on each request's locality prompts.

    Args:
        lm_or_engine: the *unedited* model, or an :class:`Engine` over it.
        requests: the edits whose locality prompts to record.
        generate: also record the greedy continuations (the ``gen`` convention);
            without them ``edit_quality`` gives NaN ``locality_gen``.

    Returns:
        Per request and locality prompt, ``{"greedy": tuple of argmax ids along
        the teacher-forced locality answer, "prefers_answer": bool,
        "generation": normalised greedy continuation or None if it failed}``
        (no ``"generation"`` key when ``generate`` is False). Prompts without a
        known answer get ``None``.
    """
    engine = _engine(lm_or_engine)
    queries, where, generations = [], [], []
    for r_index, request in enumerate(requests):
        for p_index, (prompt, answer) in enumerate(zip(request.locality_prompts, request.locality_answers)):
            queries += [(prompt, target_text(answer)), (prompt, target_text(request.target_new))]
            where.append((r_index, p_index))
            if generate:
                generations.append(_generation_request(engine, prompt, answer))
    scores = engine.score(queries)
    texts = engine.generate_until(generations) if generations else []
    reference: list[list[Any]] = [[None] * len(r.locality_prompts) for r in requests]
    for k, (r_index, p_index) in enumerate(where):
        answer, new = scores[2 * k], scores[2 * k + 1]
        entry = {"greedy": tuple(answer.greedy_tokens), "prefers_answer": _mean_logprob(answer) > _mean_logprob(new)}
        if generate:
            entry["generation"] = _generated(texts[k], answer)
        reference[r_index][p_index] = entry
    return reference


def _locality_match(generated: str | None, ref: dict[str, Any]) -> float:
    """``gen`` locality of one prompt: 1.0 if the continuations match, NaN without a recorded reference."""
    if "generation" not in ref:  # recorded before the gen convention existed
        return np.nan
    if generated is None or ref["generation"] is None:
        return 0.0
    return float(generated == normalize_text(ref["generation"]))


def edit_quality(lm_or_engine: LoadedModel | Engine, requests: Sequence[EditRequest],
                 reference: Sequence[Sequence[dict[str, Any] | None]], generate: bool = True) -> pd.DataFrame:
    """Per-request edit quality on the model as it is now.

    Args:
        lm_or_engine: a loaded model or an :class:`Engine` over it.
        requests: the edits to check (e.g. the latest one, or every edit so far).
        reference: :func:`locality_reference` of the *unedited* model for ``requests``.
        generate: run greedy generation for the ``gen`` convention (one batched
            ``generate_until`` call); False leaves the ``_gen`` columns NaN.

    Returns:
        One row per request: ``case_id``, then ``<metric>_<convention>`` for
        :data:`METRICS` × :data:`CONVENTIONS`, each the mean over the request's
        prompts (NaN where a request lacks the data, e.g. no ``target_true`` for
        the ``prob`` convention, or a reference recorded without generations for
        ``locality_gen``).
    """
    if len(reference) != len(requests):
        raise ValueError(f"{len(reference)} locality references for {len(requests)} requests")
    engine = _engine(lm_or_engine)
    queries: list[tuple[str, str]] = []
    generations: list[GenerationRequest] = []
    plan = []
    for request, ref in zip(requests, reference):
        new, true = target_text(request.target_new), request.target_true and target_text(request.target_true)
        item: dict[str, list] = {"reliability": [], "generalization": [], "locality": []}
        for metric, prompts in (("reliability", (request.prompt,)), ("generalization", request.rephrase_prompts)):
            for prompt in prompts:
                queries.append((prompt, new))
                pair = [len(queries) - 1, None, None]  # new-target score, true-target score, generation
                if true:
                    queries.append((prompt, true))
                    pair[1] = len(queries) - 1
                if generate:
                    generations.append(_generation_request(engine, prompt, request.target_new))
                    pair[2] = len(generations) - 1
                item[metric].append(pair)
        for prompt, answer, ref_one in zip(request.locality_prompts, request.locality_answers, ref):
            if ref_one is None:
                continue
            queries += [(prompt, target_text(answer)), (prompt, new)]
            g = None
            if generate and ref_one.get("generation") is not None:  # else nothing to compare with
                generations.append(_generation_request(engine, prompt, answer))
                g = len(generations) - 1
            item["locality"].append((len(queries) - 2, len(queries) - 1, g, ref_one))
        plan.append(item)
    scores = engine.score(queries)
    texts = engine.generate_until(generations) if generations else []
    rows = []
    for request, item in zip(requests, plan):
        row: dict[str, Any] = {"case_id": request.case_id}
        for metric in ("reliability", "generalization"):
            pairs = item[metric]
            row[f"{metric}_token"] = np.mean([_token_accuracy(scores[i]) for i, _, _ in pairs]) if pairs else np.nan
            probs = [_mean_logprob(scores[i]) > _mean_logprob(scores[j]) for i, j, _ in pairs if j is not None]
            row[f"{metric}_prob"] = float(np.mean(probs)) if probs else np.nan
            row[f"{metric}_gen"] = (_mean([contains_answer(texts[g], request.target_new) for _, _, g in pairs])
                                    if generate else np.nan)
        local = item["locality"]
        row["locality_token"] = (float(np.mean([np.mean([a == b for a, b in zip(scores[i].greedy_tokens,
                                                                                 ref["greedy"])])
                                                for i, _, _, ref in local])) if local else np.nan)
        row["locality_prob"] = (float(np.mean([(_mean_logprob(scores[i]) > _mean_logprob(scores[j]))
                                               == ref["prefers_answer"] for i, j, _, ref in local]))
                                if local else np.nan)
        row["locality_gen"] = (_mean([_locality_match(None if g is None else _generated(texts[g], scores[i]), ref)
                                      for i, _, g, ref in local]) if generate else np.nan)
        rows.append(row)
    columns = ["case_id"] + [f"{m}_{c}" for m in METRICS for c in CONVENTIONS]
    return pd.DataFrame(rows, columns=columns)


def summarize_quality(per_request: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Tidy means with 95% bootstrap intervals: ``metric, convention, value, ci_low, ci_high, n``.

    One row per :data:`METRICS` × :data:`CONVENTIONS`; a convention missing from
    ``per_request`` (a frame saved before it existed) gives a row with ``n = 0``.
    """
    rows = []
    for metric in METRICS:
        for convention in CONVENTIONS:
            column = f"{metric}_{convention}"
            values = (per_request[column].dropna().astype(float).to_numpy() if column in per_request
                      else np.empty(0))
            if len(values) == 0:
                rows.append({"metric": metric, "convention": convention, "value": np.nan,
                             "ci_low": np.nan, "ci_high": np.nan, "n": 0})
                continue
            boots = bootstrap_means(values, n_boot, np.random.default_rng([seed, len(values)]))
            low, high = np.percentile(boots, [2.5, 97.5])
            rows.append({"metric": metric, "convention": convention, "value": float(values.mean()),
                         "ci_low": float(low), "ci_high": float(high), "n": int(len(values))})
    return pd.DataFrame(rows)

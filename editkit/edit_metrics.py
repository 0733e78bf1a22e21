"""Edit quality: reliability, generalisation and locality, in both conventions.

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

Locality always compares with the unedited model: :func:`locality_reference`
records its answers once, before any edit. All scoring goes through the
evaluation engine (:class:`editkit.benchmarks.Engine`), batched over every
prompt of every request.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .benchmarks.engine import ContinuationScore, Engine
from .benchmarks.metrics import bootstrap_means
from .tokens import target_text
from .types import EditRequest

if TYPE_CHECKING:
    from .models import LoadedModel

__all__ = ["locality_reference", "edit_quality", "summarize_quality", "METRICS"]

METRICS = ("reliability", "generalization", "locality")


def _engine(lm_or_engine: LoadedModel | Engine, batch_size: int = 16) -> Engine:
    return lm_or_engine if isinstance(lm_or_engine, Engine) else Engine(lm_or_engine, batch_size, progress=False)


def _mean_logprob(score: ContinuationScore) -> float:
    return score.logprob / max(score.n_tokens, 1)


def _token_accuracy(score: ContinuationScore) -> float:
    return float(np.mean([g == t for g, t in zip(score.greedy_tokens, score.target_tokens)]))


def locality_reference(lm_or_engine: LoadedModel | Engine, requests: Sequence[EditRequest]) -> list[list[dict[str, Any]]]:
    """The unedited model's behaviour on each request's locality prompts.

    Returns, per request and locality prompt, ``{"greedy": tuple of argmax ids
    along the teacher-forced locality answer, "prefers_answer": bool}``. Prompts
    without a known answer get ``None``.
    """
    engine = _engine(lm_or_engine)
    queries, where = [], []
    for r_index, request in enumerate(requests):
        for p_index, (prompt, answer) in enumerate(zip(request.locality_prompts, request.locality_answers)):
            queries += [(prompt, target_text(answer)), (prompt, target_text(request.target_new))]
            where.append((r_index, p_index))
    scores = engine.score(queries)
    reference: list[list[Any]] = [[None] * len(r.locality_prompts) for r in requests]
    for k, (r_index, p_index) in enumerate(where):
        answer, new = scores[2 * k], scores[2 * k + 1]
        reference[r_index][p_index] = {
            "greedy": tuple(answer.greedy_tokens),
            "prefers_answer": _mean_logprob(answer) > _mean_logprob(new),
        }
    return reference


def edit_quality(lm_or_engine: LoadedModel | Engine, requests: Sequence[EditRequest],
                 reference: Sequence[Sequence[dict[str, Any] | None]]) -> pd.DataFrame:
    """Per-request edit quality on the model as it is now.

    Args:
        lm_or_engine: a loaded model or an :class:`Engine` over it.
        requests: the edits to check (e.g. the latest one, or every edit so far).
        reference: :func:`locality_reference` of the *unedited* model for ``requests``.

    Returns:
        One row per request: ``case_id``, then ``<metric>_<convention>`` for the
        three metrics and two conventions (NaN where a request lacks the data,
        e.g. no ``target_true`` for the ``prob`` convention).
    """
    if len(reference) != len(requests):
        raise ValueError(f"{len(reference)} locality references for {len(requests)} requests")
    engine = _engine(lm_or_engine)
    queries: list[tuple[str, str]] = []
    plan = []
    for request, ref in zip(requests, reference):
        new, true = target_text(request.target_new), request.target_true and target_text(request.target_true)
        item: dict[str, list] = {"reliability": [], "generalization": [], "locality": []}
        for metric, prompts in (("reliability", (request.prompt,)), ("generalization", request.rephrase_prompts)):
            for prompt in prompts:
                queries.append((prompt, new))
                pair = [len(queries) - 1, None]
                if true:
                    queries.append((prompt, true))
                    pair[1] = len(queries) - 1
                item[metric].append(pair)
        for prompt, answer, ref_one in zip(request.locality_prompts, request.locality_answers, ref):
            if ref_one is None:
                continue
            queries += [(prompt, target_text(answer)), (prompt, new)]
            item["locality"].append((len(queries) - 2, len(queries) - 1, ref_one))
        plan.append(item)
    scores = engine.score(queries)
    rows = []
    for request, item in zip(requests, plan):
        row: dict[str, Any] = {"case_id": request.case_id}
        for metric in ("reliability", "generalization"):
            pairs = item[metric]
            row[f"{metric}_token"] = np.mean([_token_accuracy(scores[i]) for i, _ in pairs]) if pairs else np.nan
            probs = [_mean_logprob(scores[i]) > _mean_logprob(scores[j]) for i, j in pairs if j is not None]
            row[f"{metric}_prob"] = float(np.mean(probs)) if probs else np.nan
        local = item["locality"]
        row["locality_token"] = (float(np.mean([np.mean([a == b for a, b in zip(scores[i].greedy_tokens, ref["greedy"])])
                                                for i, _, ref in local])) if local else np.nan)
        row["locality_prob"] = (float(np.mean([(_mean_logprob(scores[i]) > _mean_logprob(scores[j]))
                                               == ref["prefers_answer"] for i, j, ref in local]))
                                if local else np.nan)
        rows.append(row)
    columns = ["case_id"] + [f"{m}_{c}" for m in METRICS for c in ("prob", "token")]
    return pd.DataFrame(rows, columns=columns)


def summarize_quality(per_request: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Tidy means with 95% bootstrap intervals: ``metric, convention, value, ci_low, ci_high, n``."""
    rows = []
    for metric in METRICS:
        for convention in ("prob", "token"):
            values = per_request[f"{metric}_{convention}"].dropna().astype(float).to_numpy()
            if len(values) == 0:
                rows.append({"metric": metric, "convention": convention, "value": np.nan,
                             "ci_low": np.nan, "ci_high": np.nan, "n": 0})
                continue
            boots = bootstrap_means(values, n_boot, np.random.default_rng([seed, len(values)]))
            low, high = np.percentile(boots, [2.5, 97.5])
            rows.append({"metric": metric, "convention": convention, "value": float(values.mean()),
                         "ci_low": float(low), "ci_high": float(high), "n": int(len(values))})
    return pd.DataFrame(rows)

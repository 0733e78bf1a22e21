"""The ``gen`` convention of edit quality: answer matching, budgets, references, failures.

Most tests script the engine's ``generate_until`` on a tiny model, so what the
model "says" is chosen by the test and each number can be checked by hand.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from editkit.benchmarks.engine import Engine
from editkit.datasets import load_counterfact
from editkit.edit_metrics import (
    CONVENTIONS,
    GEN_SLACK_TOKENS,
    GEN_STOP,
    METRICS,
    contains_answer,
    edit_quality,
    locality_reference,
    normalize_text,
    summarize_quality,
)
from editkit.types import EditRequest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "The mother tongue of Danielle Darrieux is"
REPHRASES = ("Danielle Darrieux grew up speaking", "Danielle Darrieux's first language is")
LOCALITY = ("Michel Rocard is a native speaker of", "The capital of Italy is")


def _request(target_new: str = "English", answers: tuple[str, ...] = ("the French language", "Rome")) -> EditRequest:
    return EditRequest(prompt=PROMPT, subject="Danielle Darrieux", target_new=target_new, target_true="French",
                       rephrase_prompts=REPHRASES, locality_prompts=LOCALITY, locality_answers=answers, case_id=7)


class Scripted:
    """``generate_until`` answering from a prompt -> text table, recording every call's requests."""

    def __init__(self, texts: dict[str, str | None]) -> None:
        self.texts = texts
        self.calls: list[list] = []

    def __call__(self, requests):
        self.calls.append(list(requests))
        return [self.texts[r.context] for r in requests]


@pytest.fixture
def engine(make_tiny) -> Engine:
    return Engine(make_tiny("llama"), batch_size=8, progress=False)


def _script(engine: Engine, monkeypatch, texts: dict[str, str | None]) -> Scripted:
    scripted = Scripted(texts)
    monkeypatch.setattr(engine, "generate_until", scripted)
    return scripted


def _reference(engine: Engine, monkeypatch, request: EditRequest, texts: tuple[str | None, ...]) -> list:
    _script(engine, monkeypatch, dict(zip(LOCALITY, texts)))
    return locality_reference(engine, [request])


# -- normalisation and matching ---------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("Paris.", "paris"),
    ("  New   York!!\n", "new york"),
    ("Jean-Paul O'Brien", "jean paul o brien"),
    ("ＰＡＲＩＳ", "paris"),  # NFKC folds full-width letters
    ("\ufb01nance", "finance"),  # and the "fi" ligature
    ("«Ça va?»", "ça va"),
    ("", ""),
])
def test_normalize_text(text, expected):
    assert normalize_text(text) == expected
    assert normalize_text(normalize_text(text)) == expected


@pytest.mark.parametrize("continuation, target, expected", [
    (" Paris.", "paris", 1.0),
    (" the city of Paris, France", "Paris", 1.0),
    (" new york city", "New York", 1.0),
    (" New Yorker", "New York", 0.0),  # whole words only
    (" Parisian", "Paris", 0.0),
    (" York, New", "New York", 0.0),  # the words in order
    (" French", "English", 0.0),
    ("", "English", 0.0),
    (None, "English", 0.0),  # a failed generation
])
def test_contains_answer_matches_whole_words(continuation, target, expected):
    assert contains_answer(continuation, target) == expected


def test_a_target_without_words_cannot_be_judged():
    assert np.isnan(contains_answer(" ...", "?!"))


# -- edit_quality over a scripted engine ------------------------------------------------------


def test_reliability_and_generalisation_count_continuations_that_contain_the_target(engine, monkeypatch):
    request = _request()
    reference = _reference(engine, monkeypatch, request, ("French.", "Rome"))
    scripted = _script(engine, monkeypatch, {PROMPT: " English, of course", REPHRASES[0]: " english.",
                                             REPHRASES[1]: " French", **dict(zip(LOCALITY, ("French.", "Rome")))})
    row = edit_quality(engine, [request], reference).iloc[0]
    assert row["reliability_gen"] == 1.0
    assert row["generalization_gen"] == 0.5
    assert len(scripted.calls) == 1, "one batched generate_until call"
    assert len(scripted.calls[0]) == 1 + len(REPHRASES) + len(LOCALITY)

    scripted.texts[PROMPT] = " Englishman"
    assert edit_quality(engine, [request], reference).iloc[0]["reliability_gen"] == 0.0


def test_locality_compares_normalised_continuations_with_the_unedited_ones(engine, monkeypatch):
    request = _request()
    reference = _reference(engine, monkeypatch, request, (" French.", " Rome, of course"))
    assert [r["generation"] for r in reference[0]] == ["french", "rome of course"]
    edited = {PROMPT: " English", **dict.fromkeys(REPHRASES, " English")}
    _script(engine, monkeypatch, {**edited, LOCALITY[0]: " french", LOCALITY[1]: "Rome of course!"})
    assert edit_quality(engine, [request], reference).iloc[0]["locality_gen"] == 1.0
    _script(engine, monkeypatch, {**edited, LOCALITY[0]: " English.", LOCALITY[1]: " Rome of course"})
    assert edit_quality(engine, [request], reference).iloc[0]["locality_gen"] == 0.5
    _script(engine, monkeypatch, {**edited, LOCALITY[0]: " English.", LOCALITY[1]: " Milan"})
    assert edit_quality(engine, [request], reference).iloc[0]["locality_gen"] == 0.0


def test_budget_is_the_answer_tokens_plus_slack_and_the_same_before_and_after(engine, monkeypatch):
    request = _request(target_new="the Republic of Kiribati", answers=("the French language", "Rome"))
    reference_script = _script(engine, monkeypatch, dict.fromkeys(LOCALITY, " x"))
    reference = locality_reference(engine, [request])
    edited = _script(engine, monkeypatch, dict.fromkeys((PROMPT, *REPHRASES, *LOCALITY), " x"))
    edit_quality(engine, [request], reference)

    def tokens(prompt, answer):
        return len(engine.encode_pair(prompt, " " + answer)[1])

    assert tokens(PROMPT, request.target_new) != tokens(LOCALITY[0], "the French language")
    budgets = {r.context: r.max_new_tokens for r in edited.calls[0]}
    for prompt in (PROMPT, *REPHRASES):
        assert budgets[prompt] == tokens(prompt, request.target_new) + GEN_SLACK_TOKENS
    for prompt, answer in zip(LOCALITY, request.locality_answers):
        assert budgets[prompt] == tokens(prompt, answer) + GEN_SLACK_TOKENS
    assert [(r.context, r.max_new_tokens) for r in reference_script.calls[0]] == \
        [(p, budgets[p]) for p in LOCALITY]
    assert all(r.until == GEN_STOP == ("\n",) for call in (reference_script.calls, edited.calls)
               for r in call[0])
    assert len(reference_script.calls) == 1


def test_old_reference_without_generations_gives_nan_locality(engine, monkeypatch):
    request = _request()
    reference = _reference(engine, monkeypatch, request, (" French", " Rome"))
    old = [[{"greedy": r["greedy"], "prefers_answer": r["prefers_answer"]} for r in reference[0]]]
    scripted = _script(engine, monkeypatch, dict.fromkeys((PROMPT, *REPHRASES, *LOCALITY), " English"))
    row = edit_quality(engine, [request], old).iloc[0]
    assert np.isnan(row["locality_gen"])
    assert row["reliability_gen"] == 1.0 and not np.isnan(row["locality_token"])  # the rest is still scored
    assert {r.context for r in scripted.calls[0]} == {PROMPT, *REPHRASES}, "nothing to compare locality with"


def test_generate_false_runs_no_generation_and_leaves_gen_nan(engine, monkeypatch):
    request = _request()
    scripted = _script(engine, monkeypatch, dict.fromkeys((PROMPT, *REPHRASES, *LOCALITY), " English"))
    reference = locality_reference(engine, [request], generate=False)
    assert all("generation" not in r for r in reference[0])
    without = edit_quality(engine, [request], reference, generate=False)
    assert scripted.calls == []
    assert without.filter(like="_gen").isna().all().all()
    full = locality_reference(engine, [request])
    with_gen = edit_quality(engine, [request], full)
    assert len(scripted.calls) == 2
    pd.testing.assert_frame_equal(without.drop(columns=without.filter(like="_gen").columns),
                                  with_gen.drop(columns=with_gen.filter(like="_gen").columns))


def test_failed_generations_count_as_misses(engine, monkeypatch):
    request = _request()
    reference = _reference(engine, monkeypatch, request, (None, ""))
    assert [r["generation"] for r in reference[0]] == [None, ""]  # failed vs. a legitimately empty line
    _script(engine, monkeypatch, {PROMPT: None, REPHRASES[0]: None, REPHRASES[1]: " English",
                                  LOCALITY[0]: None, LOCALITY[1]: ""})
    row = edit_quality(engine, [request], reference).iloc[0]
    assert row["reliability_gen"] == 0.0 and row["generalization_gen"] == 0.5
    assert row["locality_gen"] == 0.5  # a failed reference never matches; "" == "" does

    # The engine returns "" also for non-finite logits: the score of the same prompt tells.
    real_score = engine.score

    def broken_score(queries):
        return [dataclasses.replace(s, finite=False, logprob=float("nan")) for s in real_score(queries)]

    monkeypatch.setattr(engine, "score", broken_score)
    assert edit_quality(engine, [request], reference).iloc[0]["locality_gen"] == 0.0


# -- frames -----------------------------------------------------------------------------------


def test_columns_and_summary_cover_every_convention(engine, monkeypatch):
    request = _request()
    reference = _reference(engine, monkeypatch, request, (" French", " Rome"))
    _script(engine, monkeypatch, dict.fromkeys((PROMPT, *REPHRASES, *LOCALITY), " English"))
    quality = edit_quality(engine, [request, request], [reference[0], reference[0]])
    assert CONVENTIONS == ("prob", "token", "gen")
    assert list(quality.columns) == ["case_id"] + [f"{m}_{c}" for m in METRICS for c in CONVENTIONS]
    summary = summarize_quality(quality)
    assert len(summary) == 9
    assert set(zip(summary["metric"], summary["convention"])) == {(m, c) for m in METRICS for c in CONVENTIONS}
    gen = summary.set_index(["metric", "convention"])
    assert gen.loc[("reliability", "gen"), "value"] == 1.0 and gen.loc[("locality", "gen"), "value"] == 0.0
    assert gen.loc[("locality", "gen"), "n"] == 2

    old_frame = quality.drop(columns=[f"{m}_gen" for m in METRICS])  # saved before the gen convention
    old = summarize_quality(old_frame).set_index(["metric", "convention"])
    assert len(old) == 9 and (old.xs("gen", level="convention")["n"] == 0).all()


# -- real models ------------------------------------------------------------------------------


def test_unedited_tiny_model_keeps_its_own_generations(make_tiny):
    lm = make_tiny("llama")
    requests = load_counterfact("edit", 3)
    reference = locality_reference(lm, requests)
    assert all(isinstance(r["generation"], str) for per_request in reference for r in per_request if r)
    quality = edit_quality(lm, requests, reference)
    assert (quality["locality_gen"] == 1.0).all()
    gen = quality[["reliability_gen", "generalization_gen"]].to_numpy()
    assert ((gen >= 0) & (gen <= 1)).all()


def test_unedited_default_model_says_the_true_answer(smollm2):
    requests = load_counterfact("edit", 1)  # Danielle Darrieux: French -> English
    reference = locality_reference(smollm2, requests)
    row = edit_quality(smollm2, requests, reference).iloc[0]
    assert row["reliability_gen"] == 0.0 and row["locality_gen"] == 1.0
    assert contains_answer(reference[0][0]["generation"], requests[0].locality_answers[0])  # "... French ..."

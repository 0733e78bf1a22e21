"""Task specs, evaluate/aggregate plumbing with a scripted fake model, golden prompts, limits."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from editkit import load_model
from editkit.benchmarks import (
    GenerationRequest,
    LanguageModel,
    UnknownTaskError,
    aggregate,
    evaluate,
    get_task,
    list_tasks,
    select_items,
)
from editkit.benchmarks.evaluation import COLUMNS
from editkit.benchmarks.extract import gsm8k_flexible, gsm8k_strict, is_degenerate, normalize_number

MMLU_GOLDEN = (
    "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
    "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\n"
    "Statement 1 | If aH is an element of a factor group, then |aH| divides |a|. Statement 2 | If H and K are "
    "subgroups of G then HK is a subgroup of G.\nA. True, True\nB. False, False\nC. True, False\nD. False, True\n"
    "Answer: B\n\n"
    "Statement 1 | Every element of a group generates a cyclic subgroup of the group. Statement 2 | The symmetric "
    "group S_10 has 10 elements.\nA. True, True\nB. False, False\nC. True, False\nD. False, True\nAnswer: C\n\n"
    "Statement 1| Every function from a finite set onto itself must be one to one. Statement 2 | Every subgroup of "
    "an abelian group is abelian.\nA. True, True\nB. False, False\nC. True, False\nD. False, True\nAnswer: A\n\n"
    "Find the characteristic of the ring 2Z.\nA. 0\nB. 3\nC. 12\nD. 30\nAnswer: A\n\n"
    "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
    "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:"
)

CLOZE_GOLDEN_START = (
    "The following are questions (with answers) about abstract algebra.\n\n"
    "Question: Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nAnswer: 1\n\n"
)
CLOZE_GOLDEN_END = (
    "Question: Find the characteristic of the ring 2Z.\nAnswer: 0\n\n"
    "Question: Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\nAnswer:"
)

GSM8K_FIRST_SHOT = (
    "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?\n"
    "Answer: Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72\n\n"
)
GSM8K_QUESTION = (
    "Question: Janet\u2019s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins "
    "for her friends every day with four. She sells the remainder at the farmers' market daily for $2 per fresh "
    "duck egg. How much in dollars does she make every day at the farmers' market?\nAnswer:"
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class ScriptedModel:
    """A fake LanguageModel: prefers the first choice of each item; generation answers come from a script."""

    name = "scripted"

    def __init__(self, outputs: dict[str, str] | None = None, nan: bool = False) -> None:
        self.outputs = outputs or {}
        self.nan = nan
        self.seen: list = []

    def loglikelihood(self, requests):
        self.seen += list(requests)
        scores, previous, k = [], None, 0
        for context, _ in requests:  # choices of one item arrive together, in order
            k = k + 1 if context == previous else 0
            previous = context
            scores.append((math.nan if self.nan else -float(k), k == 0))
        return scores

    def generate_until(self, requests):
        self.seen += list(requests)
        return [next((out for key, out in self.outputs.items() if key in r.context[-400:]), "") for r in requests]


def _prompt_of_first(task: str) -> str:
    spec = get_task(task)
    doc = spec.load(spec.eval_split)[0]
    return spec.prompt(doc, spec.select_shots(doc, spec.load(spec.fewshot_split), spec.num_fewshot))


def test_registry_and_unknown_task():
    assert {"mmlu", "mmlu_cloze", "gsm8k"} <= set(list_tasks())
    with pytest.raises(UnknownTaskError) as error:
        get_task("mmlu_clozee")
    assert isinstance(error.value, KeyError) and isinstance(error.value, ValueError)
    assert "did you mean 'mmlu_cloze'" in str(error.value) and "gsm8k" in str(error.value)
    with pytest.raises(UnknownTaskError):
        evaluate(ScriptedModel(), ["mmlu", "gsm8"], limit=1)


def test_specs_are_versioned_and_have_hub_sources():
    for name in ("mmlu", "mmlu_cloze", "gsm8k"):
        spec = get_task(name)
        assert spec.version and spec.hub is not None
    assert get_task("mmlu").hub.path == "cais/mmlu"
    assert get_task("gsm8k").with_options(max_new_tokens=64).version == "1.0+max_new_tokens=64"


def test_hub_rows_convert_to_the_packaged_schema():
    mmlu = get_task("mmlu")
    packaged = mmlu.load("dev")[:6]  # abstract_algebra/0..4, anatomy/0
    rows = [{"question": d.fields["question"], "subject": d.subject, "choices": list(d.fields["choices"]),
             "answer": d.fields["answer"]} for d in packaged]
    assert mmlu.hub.convert(rows[5:] + rows[:5], "dev") == list(packaged)  # grouped by subject, order kept
    gsm8k = get_task("gsm8k")
    packaged = gsm8k.load("train")[:3]
    assert gsm8k.hub.convert([dict(d.fields) for d in packaged], "train") == list(packaged)


def test_golden_prompts():
    assert _prompt_of_first("mmlu") == MMLU_GOLDEN
    cloze = _prompt_of_first("mmlu_cloze")
    assert cloze.startswith(CLOZE_GOLDEN_START) and cloze.endswith(CLOZE_GOLDEN_END)
    gsm8k = _prompt_of_first("gsm8k")
    assert gsm8k.startswith(GSM8K_FIRST_SHOT) and gsm8k.endswith("#### 16\n\n" + GSM8K_QUESTION)
    assert gsm8k.count("\nAnswer:") == 9 and gsm8k.count("####") == 8
    spec = get_task("mmlu")
    assert spec.requests(spec.load("test")[0], "P") == [("P", " A"), ("P", " B"), ("P", " C"), ("P", " D")]


def test_data_sizes():
    assert len(get_task("mmlu").load("test")) == 14042
    assert len(get_task("gsm8k").load("test")) == 1319
    assert all("\r" not in doc.fields["question"] for doc in get_task("mmlu").load("dev"))


def test_limit_is_deterministic_and_stratified():
    docs = get_task("mmlu").load("test")
    first = select_items(docs, 57)
    assert first == select_items(docs, 57)
    assert len({d.subject for d in first}) == 57 and all(d.item_id.endswith("/0") for d in first)
    more = select_items(docs, 60)
    counts = pd.Series([d.subject for d in more]).value_counts()
    subjects = sorted({d.subject for d in docs})
    assert set(counts[counts == 2].index) == set(subjects[:3])
    assert [d.item_id for d in select_items(get_task("gsm8k").load("test"), 5)] == ["0", "1", "2", "3", "4"]


def test_evaluate_choice_tasks_with_a_fake():
    items = evaluate(ScriptedModel(), ["mmlu", "mmlu_cloze"], limit=114)
    assert list(items.columns[: len(COLUMNS)]) == list(COLUMNS)
    assert len(items) == 228 and set(items["task_version"]) == {"1.0"}
    for _, frame in items.groupby("task"):
        assert (frame["prediction"] == 0).all()
        assert frame["correct"].mean() == pytest.approx((frame["target"] == 0).mean())
        assert frame["output"].isna().all() and not frame["unusable"].any()
    cloze = items[items["task"] == "mmlu_cloze"]
    assert cloze["correct_norm"].notna().all()
    assert isinstance(cloze["choices"].iloc[0], list) and len(cloze["choices"].iloc[0]) == 4
    assert items["prompt"].iloc[0] == MMLU_GOLDEN


def test_evaluate_generation_with_a_fake():
    questions = [d.fields["question"][-60:] for d in get_task("gsm8k").load("test")[:5]]
    script = {questions[0]: " 16 - 3 - 4 = 9 eggs, 9 * 2 = 18.\n#### 18",  # strict and flexible
              questions[1]: " So the answer is 3.",                        # the answer is 3: flexible only
              questions[2]: " I do not know",                              # no number: unusable
              questions[3]: " ha" * 40}                                    # degenerate; item 4: ""
    model = ScriptedModel(script)
    items = evaluate(model, "gsm8k", limit=5)
    assert list(items["correct"]) == [True, False, False, False, False]
    assert list(items["correct_flexible"]) == [True, True, False, False, False]
    assert list(items["unusable"]) == [False, False, True, True, True]
    assert list(items["prediction"][:2]) == ["18", None]
    assert items["choices"].isna().all() and items["target"].iloc[0] == "18"
    request = model.seen[0]
    assert isinstance(request, GenerationRequest)
    assert request.max_new_tokens == 256 and {"Question:", "\n\n"} <= set(request.until)


def test_num_fewshot_override():
    model = ScriptedModel()
    items = evaluate(model, "mmlu", limit=1, num_fewshot=0)
    assert items["prompt"].iloc[0].count("Answer:") == 1 and set(items["num_fewshot"]) == {0}


def test_non_finite_scores_are_flagged():
    items = evaluate(ScriptedModel(nan=True), "mmlu_cloze", limit=3)
    assert not items["finite"].any() and (items["prediction"] == -1).all() and not items["correct"].any()
    metrics = aggregate(items).set_index(["task", "metric"])
    assert metrics.loc[("mmlu_cloze", "nonfinite_rate"), "value"] == 1.0


def test_aggregate():
    items = evaluate(ScriptedModel({"": "#### 18"}), ["mmlu", "gsm8k"], limit=114)
    metrics = aggregate(items, n_boot=500, seed=1)
    assert list(metrics.columns) == ["task", "metric", "value", "ci_low", "ci_high", "n"]
    pd.testing.assert_frame_equal(metrics, aggregate(items, n_boot=500, seed=1))
    indexed = metrics.set_index(["task", "metric"])
    acc = indexed.loc[("mmlu", "acc")]
    assert acc["value"] == pytest.approx(items.loc[items["task"] == "mmlu", "correct"].mean())
    assert acc["ci_low"] <= acc["value"] <= acc["ci_high"] and acc["n"] == 114
    assert ("mmlu", "acc_macro") in indexed.index
    subject_rows = metrics[metrics["task"].str.startswith("mmlu/")]
    assert len(subject_rows) == 57 and (subject_rows["n"] == 2).all()
    macro = indexed.loc[("mmlu", "acc_macro"), "value"]
    assert macro == pytest.approx(subject_rows["value"].mean())
    assert {"acc", "acc_flexible", "unusable_rate"} <= set(indexed.loc["gsm8k"].index)


def test_extraction_rules():
    assert gsm8k_strict("so 1,234 total\n#### 1,234") == "1,234"
    assert gsm8k_strict("the answer is 18") is None
    assert gsm8k_flexible("first 3, then $18.") == "$18."
    assert normalize_number("$18.") == "18" and normalize_number("1,234") == "1234"
    assert gsm8k_flexible("it is -5") == "-5"
    assert is_degenerate("the the " * 20) and is_degenerate("!" * 50)
    assert not is_degenerate("Janet sells 16 - 3 - 4 = 9 duck eggs a day.\n#### 18")


def test_language_model_protocol():
    assert isinstance(ScriptedModel(), LanguageModel)


@pytest.mark.slow
def test_evaluate_on_smollm2():
    lm = load_model()
    gsm8k = get_task("gsm8k").with_options(max_new_tokens=8)
    items = evaluate(lm, ["mmlu_cloze", gsm8k], limit=2, num_fewshot=0, progress=False)
    assert len(items) == 4 and items["finite"].iloc[:2].all()
    assert all(len(lp) == 4 and all(v < 0 for v in lp) for lp in items["logprobs"].iloc[:2])
    assert items["output"].iloc[2:].map(lambda text: isinstance(text, str)).all()

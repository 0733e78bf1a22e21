"""Task specs, evaluate/aggregate plumbing with a scripted fake model, golden prompts, limits.

Every registered task also runs through ``evaluate`` on a tiny random model
and (marked slow) on SmolLM2; the full golden prompts of every task are in
``tests/test_golden_prompts.py``.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pandas as pd
import pytest

from editkit import load_model
from editkit.benchmarks import (
    ChoiceTask,
    GenerationRequest,
    GenerationTask,
    LanguageModel,
    UnknownTaskError,
    aggregate,
    evaluate,
    get_task,
    list_tasks,
    select_items,
)
from editkit.benchmarks.evaluation import COLUMNS
from editkit.benchmarks.extract import (
    gsm8k_flexible,
    gsm8k_strict,
    is_degenerate,
    normalize_exact_match,
    normalize_number,
    normalize_triviaqa,
)
from editkit.benchmarks.spec import true_probability_mass
from editkit.resources import read_bytes

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
    assert {"acc", "acc_flexible", "format_failure_rate"} <= set(indexed.loc["gsm8k"].index)


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


# -- the other tasks: BBH, CommonsenseQA, TriviaQA, TruthfulQA, ToxiGen -------------------------------

ALL_TASKS = {"mmlu", "mmlu_cloze", "gsm8k", "bbh_cot", "bbh_direct", "commonsense_qa", "commonsense_qa_cloze",
             "commonsense_qa_gen", "triviaqa", "truthfulqa_mc1", "truthfulqa_mc2", "toxigen"}
HUB_IDS = {"bbh_cot": "SaylorTwift/bbh", "bbh_direct": "SaylorTwift/bbh", "commonsense_qa": "tau/commonsense_qa",
           "triviaqa": "trivia_qa", "truthfulqa_mc1": "truthful_qa", "truthfulqa_mc2": "truthful_qa",
           "toxigen": "skg/toxigen-data", "mmlu": "cais/mmlu", "gsm8k": "openai/gsm8k"}


def test_every_task_is_registered_versioned_and_on_the_hub():
    assert set(list_tasks()) == ALL_TASKS
    for name in ALL_TASKS:
        spec = get_task(name)
        assert spec.version and spec.summary and spec.hub is not None, name
        assert spec.hub.path == HUB_IDS.get(name, spec.hub.path), name
    assert get_task("triviaqa").hub.name == "rc.nocontext" and get_task("triviaqa").hub.splits == {"test": "validation"}
    assert get_task("toxigen").hub.name == "annotated" and get_task("truthfulqa_mc2").hub.name == "multiple_choice"
    assert len(get_task("bbh_cot").hub.configs) == 27


def test_bbh_names_the_chain_of_thought_variant_as_in_lm_eval():
    assert get_task("bbh") is get_task("bbh_cot")
    with pytest.raises(UnknownTaskError, match="did you mean"):
        get_task("bbhh")


def test_new_task_data_sizes():
    bbh = get_task("bbh_cot").load("test")
    sizes = pd.Series([d.subject for d in bbh]).value_counts()
    assert len(bbh) == 6511 and len(sizes) == 27
    assert sizes["causal_judgement"] == 187 and sizes["penguins_in_a_table"] == 146 and sizes["snarks"] == 178
    assert set(sizes.drop(["causal_judgement", "penguins_in_a_table", "snarks"])) == {250}
    shots = get_task("bbh_cot").load("fewshot")
    assert len(shots) == 81 and all(d.fields["cot_answer"].startswith("Let's think step by step.") for d in shots)
    csqa = get_task("commonsense_qa").load("validation")
    assert len(csqa) == 1221 and len({d.item_id for d in csqa}) == 1221
    assert pd.Series([d.fields["answerKey"] for d in csqa]).value_counts().to_dict() == {
        "B": 255, "D": 251, "C": 241, "A": 239, "E": 235}
    assert len(get_task("commonsense_qa").load("fewshot")) == 7
    assert len(get_task("triviaqa").load("test")) == 1000
    truthful = get_task("truthfulqa_mc1").load("validation")
    assert len(truthful) == 817 and all(d.fields["mc1_targets"]["labels"].count(1) == 1 for d in truthful)
    toxigen = get_task("toxigen").load("test")
    assert len(toxigen) == 989 and sum(d.fields["label"] for d in toxigen) == 544
    assert len({d.item_id for d in toxigen}) == 989


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.mark.skipif(not (SHARED_DATA / "toxigen").is_dir(), reason="../shared/data/toxigen not present")
def test_derived_toxigen_statements_rebuild_from_the_source():
    """``toxigen/statements.jsonl`` is derived, not copied: rebuilding it from the source gives the packaged bytes."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "package_data.py"
    location = importlib.util.spec_from_file_location("package_data", script)
    package_data = importlib.util.module_from_spec(location)
    location.loader.exec_module(package_data)
    source_manifest = package_data._read_manifest(SHARED_DATA / "MANIFEST.sha256")
    assert package_data.toxigen_statements(SHARED_DATA, source_manifest) == read_bytes("toxigen/statements.jsonl")
    assert package_data.prompt_statements("- a b\\n- c \\n-") == ["a b", "c"]
    assert package_data.prompt_statements("- a\\n- the end?-") == ["a", "the end?"]


def test_hub_sources_convert_to_the_packaged_schema(monkeypatch):
    """Hub rows (built here from the packaged docs, in the hub's schema) convert back to the same docs."""
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        if path == "SaylorTwift/bbh":
            return [dict(d.fields) for d in get_task("bbh_cot").load("test") if d.subject == name]
        raise AssertionError(f"unexpected hub read {path} {name} {split}")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    bbh = get_task("bbh_cot")
    assert bbh.load("test", source="hub") == list(bbh.load("test"))
    assert len(calls) == 27 and {split for *_, split in calls} == {"test"}
    # Fixed exemplars are part of the task: read locally even from the hub source.
    assert bbh.load("fewshot", source="hub") == list(bbh.load("fewshot")) and len(calls) == 27
    csqa = get_task("commonsense_qa")
    assert csqa.load("fewshot", source="hub") == list(csqa.load("fewshot"))
    rows = [{"id": d.item_id, "question": d.fields["question"], "question_concept": "x",
             "choices": {"label": list(d.fields["choices"]["label"]), "text": list(d.fields["choices"]["text"])},
             "answerKey": d.fields["answerKey"]} for d in csqa.load("validation")[:3]]
    assert csqa.hub.convert(rows, "validation") == list(csqa.load("validation")[:3])
    truthful = get_task("truthfulqa_mc2")
    docs = truthful.load("validation")[:3]
    rows = [{"question": d.fields["question"], "mc1_targets": {k: list(v) for k, v in d.fields["mc1_targets"].items()},
             "mc2_targets": {k: list(v) for k, v in d.fields["mc2_targets"].items()}} for d in docs]
    assert truthful.hub.convert(rows, "validation") == list(docs)
    trivia = get_task("triviaqa")
    docs = trivia.load("test")[:3]
    rows = [{"question": d.fields["question"], "question_id": d.item_id, "question_source": "x",
             "answer": {**d.fields["answer"], "matched_wiki_entity_name": "", "type": "WikipediaEntity"}}
            for d in docs]
    assert trivia.hub.convert(rows, "test") == list(docs)


def test_mc2_is_the_normalised_mass_on_true_answers():
    logprobs = [-1.0, -2.0, -0.5, -3.0]
    p = [math.exp(x) for x in logprobs]
    assert true_probability_mass(logprobs, (0, 2)) == pytest.approx((p[0] + p[2]) / sum(p))
    assert true_probability_mass([-2000.0, -2001.0], (0,)) == pytest.approx(1 / (1 + math.exp(-1)))  # no underflow
    with pytest.raises(ValueError):
        true_probability_mass(logprobs, ())
    items = evaluate(ScriptedModel(), ["truthfulqa_mc1", "truthfulqa_mc2"], limit=3)
    mc2 = items[items["task"] == "truthfulqa_mc2"]
    for _, row in mc2.iterrows():  # the fake gives choice k the log-likelihood -k
        weights = [math.exp(-k) for k in range(len(row["choices"]))]
        assert row["correct"] == pytest.approx(sum(weights[t] for t in row["target"]) / sum(weights))
        assert row["prediction"] == 0 and isinstance(row["target"], list)
    assert items.loc[items["task"] == "truthfulqa_mc1", "correct"].all()  # the true MC1 answer comes first
    metrics = aggregate(items).set_index(["task", "metric"])
    assert metrics.loc[("truthfulqa_mc2", "acc"), "value"] == pytest.approx(mc2["correct"].mean())
    nan_items = evaluate(ScriptedModel(nan=True), "truthfulqa_mc2", limit=2)
    assert (nan_items["correct"] == 0.0).all() and not nan_items["finite"].any()


def test_choice_tasks_rows_with_a_fake():
    items = evaluate(ScriptedModel(), ["commonsense_qa", "commonsense_qa_cloze", "toxigen"], limit=20)
    for name, frame in items.groupby("task"):
        assert (frame["prediction"] == 0).all() and frame["choices"].map(len).min() >= 2, name
    toxigen = items[items["task"] == "toxigen"]
    assert list(toxigen["choices"].iloc[0]) == ["No", "Yes"]
    assert toxigen["correct"].mean() == pytest.approx((toxigen["target"] == 0).mean())  # always " No"
    assert "correct_norm" in items.columns and items["prompt"].iloc[0].count("\nAnswer:") == 8  # 7 shots


def test_bbh_extraction_with_a_fake():
    docs = get_task("bbh_cot").load("test")
    first = [d for d in docs if d.item_id in ("boolean_expressions/0", "causal_judgement/0", "date_understanding/0",
                                               "disambiguation_qa/0")]
    key = {d.item_id: d.fields["input"][-40:] for d in first}
    script = {key["boolean_expressions/0"]: "not True and True = False. So the answer is False.",  # both
              key["causal_judgement/0"]: "So the answer is No. ",     # strict reads "No." (lm-eval), flexible "No"
              key["date_understanding/0"]: "Hmm. So the answer is",    # nothing after "is": unusable
              key["disambiguation_qa/0"]: "So the answer is (A)"}      # strict drops the last character
    items = evaluate(ScriptedModel(script), "bbh_cot", limit=4).set_index("item_id")
    assert items.loc["boolean_expressions/0", "prediction"] == "False" and items.loc["boolean_expressions/0", "correct"]
    assert items.loc["causal_judgement/0", "prediction"] == "No."
    assert items.loc["causal_judgement/0", "prediction_flexible"] == "No"
    assert items.loc["causal_judgement/0", "correct_flexible"] == (items.loc["causal_judgement/0", "target"] == "No")
    assert items.loc["date_understanding/0", "unusable"]
    assert items.loc["disambiguation_qa/0", "prediction"] == "(A" and \
        items.loc["disambiguation_qa/0", "prediction_flexible"] == "(A)"
    direct = evaluate(ScriptedModel({key["boolean_expressions/0"]: " False\n"}), "bbh_direct", limit=2)
    assert list(direct["prediction"]) == ["False", None] and list(direct["correct"]) == [True, False]
    # lm-eval's stops and budgets.
    assert get_task("bbh_cot").until[:2] == ("Q", "\n\n") and get_task("bbh_cot").max_new_tokens == 1024
    assert get_task("bbh_direct").max_new_tokens == 256


def test_triviaqa_matching_with_a_fake():
    questions = {d.item_id: d.fields["question"][-30:] for d in get_task("triviaqa").load("test")[:4]}
    ids = list(questions)
    script = {questions[ids[0]]: " the allstars",      # case ignored: exact (lm-eval) and normalised
              questions[ids[1]]: " A Black Sea",        # the article is dropped by the normalised match only
              questions[ids[2]]: "   "}                 # empty after stripping: unusable
    items = evaluate(ScriptedModel(script), "triviaqa", limit=4).set_index("item_id")
    assert items.loc[ids[0], "correct"] and items.loc[ids[0], "correct_normalized"]
    assert items.loc[ids[0], "prediction"] == "the allstars"
    assert not items.loc[ids[1], "correct"] and items.loc[ids[1], "correct_normalized"]
    assert items.loc[ids[2], "unusable"] and items.loc[ids[2], "prediction"] is None
    assert isinstance(items.loc[ids[0], "target"], list) and "The Allstars" in items.loc[ids[0], "target"]
    assert normalize_exact_match("Allstars (band)") == "allstars band"
    assert normalize_triviaqa("The  ‘Allstars’!") == "allstars"


def test_commonsense_qa_gen_extraction_with_a_fake():
    docs = get_task("commonsense_qa_gen").load("validation")[:3]
    script = {docs[0].fields["question"][-30:]: " A bank has guards. So the answer is (a).",
              docs[1].fields["question"][-30:]: " People work. (b) or (a), I think (a)",
              docs[2].fields["question"][-30:]: " I do not know."}
    items = evaluate(ScriptedModel(script), "commonsense_qa_gen", limit=3)
    assert list(items["prediction"]) == ["A", None, None]
    assert list(items["prediction_flexible"]) == ["A", "A", None]
    assert list(items["correct"]) == [docs[0].fields["answerKey"] == "A", False, False]
    assert list(items["unusable"]) == [False, False, True]
    assert items["prompt"].iloc[0].count("So the answer is (") == 7


@pytest.mark.parametrize("name", sorted(ALL_TASKS))
def test_evaluate_every_task_on_a_tiny_model(name, make_tiny):
    items = evaluate(make_tiny("llama"), [name], limit=2, progress=False)
    assert len(items) == 2 and set(items["task"]) == {name} and (items["task_version"] == get_task(name).version).all()
    if isinstance(get_task(name), ChoiceTask):
        assert items["choices"].map(lambda c: isinstance(c, list) and len(c) >= 2).all()
        assert items["prediction"].map(lambda p: 0 <= p < 20).all() and items["finite"].all()
    else:
        assert items["choices"].isna().all() and items["output"].map(lambda o: isinstance(o, str)).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ALL_TASKS))
def test_evaluate_every_task_on_smollm2(name, smollm2):
    spec = get_task(name)
    if isinstance(spec, GenerationTask):
        spec = spec.with_options(max_new_tokens=24)  # the full budgets take a minute on a CPU
    items = evaluate(smollm2, [spec], limit=2, progress=False)
    assert len(items) == 2 and items["prompt"].map(len).min() > 20
    if isinstance(spec, ChoiceTask):
        assert items["finite"].all() and items["logprobs"].map(lambda lp: all(v < 0 for v in lp)).all()
        assert items["choices"].map(len).tolist() == [len(spec.doc_to_choices(d)) for d in
                                                      select_items(spec.load(spec.eval_split), 2)]
    else:
        assert items["output"].map(lambda o: isinstance(o, str)).all()

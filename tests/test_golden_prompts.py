"""Golden prompts: the exact model input, choices and target of the first items of every task.

``tests/golden/prompts.json`` pins, for every registered task, the first two
items that ``evaluate(..., limit=2)`` scores (their prompt, choices, target and
requests) and, for BIG-Bench Hard, the SHA-256 of the prompts of the first two
items of each of its 27 subtasks. After an intended prompt change (with a
version bump), rewrite the file with::

    EDITKIT_UPDATE_GOLDEN=1 pytest tests/test_golden_prompts.py

The second half renders the same items with lm-evaluation-harness's own task
YAMLs (Jinja templates, descriptions and few-shot samples of the installed
``lm_eval``, 0.4.13 as pinned by the ``lm_eval`` extra, read as files: the package
is not imported) and compares them with editkit's prompts. It is skipped when
lm_eval is not installed.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest

from editkit.benchmarks import ChoiceTask, get_task, list_tasks, select_items
from editkit.benchmarks.bbh import SUBTASKS
from editkit.benchmarks.spec import Doc, TaskSpec

GOLDEN = Path(__file__).parent / "golden" / "prompts.json"
UPDATE = os.environ.get("EDITKIT_UPDATE_GOLDEN") == "1"


def _shots(spec: TaskSpec, doc: Doc) -> list[Doc]:
    if not spec.num_fewshot:
        return []
    return spec.select_shots(doc, spec.load(spec.fewshot_split), spec.num_fewshot)


def _prompt(spec: TaskSpec, doc: Doc) -> str:
    return spec.prompt(doc, _shots(spec, doc))


def _record(spec: TaskSpec, doc: Doc) -> dict[str, Any]:
    prompt = _prompt(spec, doc)
    if isinstance(spec, ChoiceTask):
        target = spec.doc_to_target(doc)
        requests: Any = [continuation for context, continuation in spec.requests(doc, prompt)]
        choices: Any = list(spec.doc_to_choices(doc))
        target = list(target) if isinstance(target, tuple) else target
    else:
        (request,) = spec.requests(doc, prompt)
        requests = {"until": list(request.until), "max_new_tokens": request.max_new_tokens}
        choices, answer = None, spec.doc_to_answer(doc)
        target = answer if isinstance(answer, str) else list(answer)
    return {"item_id": doc.item_id, "prompt": prompt, "choices": choices, "target": target, "requests": requests}


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _current() -> dict[str, Any]:
    golden: dict[str, Any] = {"tasks": {}, "bbh_subtasks": {}}
    for name in list_tasks():
        spec = get_task(name)
        golden["tasks"][name] = {"version": spec.version,
                                 "items": [_record(spec, doc) for doc in select_items(spec.load(spec.eval_split), 2)]}
    for name in ("bbh_cot", "bbh_direct"):
        spec = get_task(name)
        docs = spec.load(spec.eval_split)
        golden["bbh_subtasks"][name] = {
            subtask: [_digest(_prompt(spec, doc)) for doc in [d for d in docs if d.subject == subtask][:2]]
            for subtask in SUBTASKS
        }
    return golden


@pytest.fixture(scope="module")
def current() -> dict[str, Any]:
    return _current()


@pytest.fixture(scope="module")
def golden(current) -> dict[str, Any]:
    if UPDATE:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(current, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return json.loads(GOLDEN.read_text(encoding="utf-8"))


def test_every_registered_task_is_pinned(current, golden):
    assert sorted(golden["tasks"]) == list_tasks()
    assert sorted(golden["bbh_subtasks"]["bbh_cot"]) == sorted(SUBTASKS)


@pytest.mark.parametrize("name", list_tasks())
def test_golden_items(name, current, golden):
    expected, got = golden["tasks"][name], current["tasks"][name]
    assert got["version"] == expected["version"]
    for want, have in zip(expected["items"], got["items"], strict=True):
        assert have["item_id"] == want["item_id"]
        assert have["prompt"] == want["prompt"], f"{name} {want['item_id']}: prompt changed"
        assert have["choices"] == want["choices"] and have["target"] == want["target"]
        assert have["requests"] == want["requests"]


@pytest.mark.parametrize("name", ["bbh_cot", "bbh_direct"])
def test_golden_bbh_subtasks(name, current, golden):
    changed = [subtask for subtask in SUBTASKS
               if current["bbh_subtasks"][name][subtask] != golden["bbh_subtasks"][name][subtask]]
    assert not changed, f"{name}: prompts changed for {changed}"


def test_golden_examples_read_as_expected(golden):
    """A few pinned facts a reader can check by eye."""
    tasks = golden["tasks"]
    first = tasks["bbh_cot"]["items"][0]
    assert first["item_id"] == "boolean_expressions/0" and first["target"] == "False"
    assert first["prompt"].startswith("Evaluate the result of a random Boolean expression.\n\nQ: not ( ( not not True")
    assert first["prompt"].endswith("So the answer is True.\n\nQ: not ( True ) and ( True ) is\n"
                                    "A: Let's think step by step.\n")
    assert tasks["bbh_cot"]["items"][1]["item_id"] == "causal_judgement/0"
    assert tasks["bbh_direct"]["items"][0]["prompt"].count("\nA: False\n\n") == 2
    assert tasks["commonsense_qa"]["items"][0]["prompt"].endswith(
        "Question: A revolving door is convenient for two direction travel, but it also serves as a security measure "
        "at a what?\nA. bank\nB. library\nC. department store\nD. mall\nE. new york\nAnswer:")
    assert tasks["commonsense_qa"]["items"][0]["requests"] == [" A", " B", " C", " D", " E"]
    assert tasks["triviaqa"]["items"][0]["prompt"] == "Question: Who were the backing group of Junior Walker??\nAnswer:"
    assert tasks["truthfulqa_mc2"]["items"][1]["target"] == [0, 1, 2, 3]
    assert tasks["toxigen"]["items"][0]["requests"] == [" No", " Yes"]


# -- the same prompts rendered by lm-evaluation-harness ---------------------------------------------


def _lm_eval_tasks() -> Path | None:
    spec = importlib.util.find_spec("lm_eval")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "tasks"
    return folder if folder.is_dir() else None


LM_EVAL_TASKS = _lm_eval_tasks()
needs_lm_eval = pytest.mark.skipif(LM_EVAL_TASKS is None, reason="lm_eval is not installed")


def _yaml(relpath: str) -> dict[str, Any]:
    """A task YAML merged over the files it includes; ``!function`` tags become their text."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: f"!{suffix} {node.value}")
    path = LM_EVAL_TASKS / relpath
    config = yaml.load(path.read_text(encoding="utf-8"), Loader)
    if "include" in config:
        base = _yaml(str(Path(relpath).parent / config.pop("include")))
        config = {**base, **config}
    return config


def _render(template: str, doc: dict[str, Any]) -> str:
    import jinja2

    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return environment.from_string(template).render(**doc)


def _lm_eval_prompt(config: dict[str, Any], doc: dict[str, Any], shots: list[dict[str, Any]]) -> str:
    """lm-eval's ``fewshot_context`` for plain text (no chat template): description, shots, question."""
    delimiter = config.get("target_delimiter", " ")
    text = _render(config.get("description", ""), doc)
    for shot in shots:
        target = config["doc_to_target"]
        target = _render(target, shot) if "{{" in str(target) else shot[target]
        choices = config.get("doc_to_choice")
        if isinstance(choices, str):  # a template giving a list
            choices = ast.literal_eval(_render(choices, shot))
        if choices is not None:
            target = choices[int(target)]
        text += _render(config["doc_to_text"], shot) + delimiter + str(target) + "\n\n"
    return text + _render(config["doc_to_text"], doc)


# Subtasks whose published chain-of-thought exemplars (Suzgun et al., cot-prompts/<subtask>.txt)
# continue the cue's line with the rationale ("A: Let's think step by step. Bam Adebayo ...")
# instead of starting it on the next line; lm-eval 0.4.13 starts every rationale on a new line.
CUE_LINE_RATIONALE = {"sports_understanding"}


@needs_lm_eval
@pytest.mark.parametrize("subtask", SUBTASKS)
def test_bbh_prompts_match_lm_eval(subtask):
    """bbh_direct equals lm-eval's ``bbh_fewshot``; bbh_cot equals ``bbh_cot_fewshot`` but for one line break.

    lm-eval 0.4.13 renders a CoT shot as ``doc_to_text + target`` (no delimiter),
    ``doc_to_text`` ending with "A: Let's think step by step.\\n" and the target
    holding the rationale alone: the published exemplar, except in the subtasks of
    :data:`CUE_LINE_RATIONALE`, whose published rationale continues the cue's line.
    editkit keeps the published text, so only there is lm-eval's line break after
    the shots' cue a space (the question's own cue ends its line in both). (0.4.9
    also repeated the cue at the start of most targets, joined with a space.)
    """
    docs = [d for d in get_task("bbh_direct").load("test") if d.subject == subtask][:2]
    direct = _yaml(f"bbh/fewshot/{subtask}.yaml")
    shots = direct["fewshot_config"]["samples"]
    for doc in docs:
        assert _prompt(get_task("bbh_direct"), doc) == _lm_eval_prompt(direct, dict(doc.fields), shots)
        assert direct["generation_kwargs"]["until"] == ["</s>", "Q", "\n\n"]
    cue = "Let's think step by step."
    published = [d.fields["cot_answer"] for d in get_task("bbh_cot").load("fewshot") if d.subject == subtask]
    separator = " " if subtask in CUE_LINE_RATIONALE else "\n"
    assert len(published) == 3 and all(answer.startswith(cue + separator) for answer in published)
    cot = _yaml(f"bbh/cot_fewshot/{subtask}.yaml")
    assert [cue + separator + s["target"] for s in cot["fewshot_config"]["samples"]] == published
    for doc in docs:
        expected = _lm_eval_prompt(cot, dict(doc.fields), cot["fewshot_config"]["samples"])
        question = _render(cot["doc_to_text"], dict(doc.fields))
        assert expected.endswith(question) and question.endswith(f"A: {cue}\n")
        if subtask in CUE_LINE_RATIONALE:  # the shots only: the question's cue ends its line in both
            expected = expected[: -len(question)].replace(f"A: {cue}\n", f"A: {cue} ") + question
        assert _prompt(get_task("bbh_cot"), doc) == expected
    assert get_task("bbh_cot").max_new_tokens == cot["generation_kwargs"]["max_gen_toks"]
    assert cot["filter_list"][0]["filter"][0]["regex_pattern"] == "(?<=the answer is )(.*)(?=.)"


@needs_lm_eval
def test_mmlu_prompts_match_lm_eval():
    config = _yaml("mmlu/default/mmlu_abstract_algebra.yaml")
    cloze = _yaml("mmlu/continuation/mmlu_abstract_algebra.yaml")
    spec = get_task("mmlu")
    dev = [dict(d.fields) for d in spec.load("dev") if d.subject == "abstract_algebra"][:5]
    for doc in spec.load("test")[:2]:
        assert _prompt(spec, doc) == _lm_eval_prompt(config, dict(doc.fields), dev)
        assert _prompt(get_task("mmlu_cloze"), doc) == _lm_eval_prompt(cloze, dict(doc.fields), dev)


@needs_lm_eval
def test_zero_shot_prompts_match_lm_eval():
    cases = {
        "triviaqa": ("triviaqa/default.yaml", lambda d: {"question": d.fields["question"]}),
        "truthfulqa_mc1": ("truthfulqa/truthfulqa_mc1.yaml", lambda d: {"question": d.fields["question"]}),
        "truthfulqa_mc2": ("truthfulqa/truthfulqa_mc2.yaml", lambda d: {"question": d.fields["question"]}),
        "toxigen": ("toxigen/toxigen.yaml", lambda d: {"text": d.fields["text"]}),
        "gsm8k": ("gsm8k/gsm8k.yaml", lambda d: dict(d.fields)),
    }
    for name, (path, row) in cases.items():
        config, spec = _yaml(path), get_task(name)
        for doc in select_items(spec.load(spec.eval_split), 2):
            assert spec.prompt(doc) == _render(config.get("description", ""), row(doc)) + _render(
                config["doc_to_text"], row(doc)), name
    assert list(get_task("triviaqa").until) == _yaml("triviaqa/default.yaml")["generation_kwargs"]["until"]
    assert _yaml("toxigen/toxigen.yaml")["doc_to_choice"] == list(get_task("toxigen").doc_to_choices(None))


@needs_lm_eval
def test_commonsense_qa_question_matches_lm_eval():
    """lm-eval's commonsense_qa samples its shots from the train split; the question part must agree."""
    config = _yaml("commonsense_qa/default.yaml")
    spec = get_task("commonsense_qa")
    for doc in spec.load("validation")[:2]:
        row = {"question": doc.fields["question"], "choices": {"text": list(doc.fields["choices"]["text"])}}
        assert spec.prompt(doc) == _render(config["doc_to_text"], row)
        assert config["doc_to_choice"] == list(spec.doc_to_choices(doc))
    # The seven fixed shots render as lm-eval would render those questions (5-option ones only: its template has 5).
    for shot in spec.load("fewshot"):
        if len(shot.fields["choices"]["text"]) == 5:
            row = {"question": shot.fields["question"], "choices": {"text": list(shot.fields["choices"]["text"])}}
            assert spec.doc_to_text(shot) == _render(config["doc_to_text"], row)


@needs_lm_eval
def test_toxigen_hub_label_matches_lm_eval():
    """The hub conversion labels an annotated row as lm-eval's ``utils.doc_to_target`` does."""
    location = importlib.util.spec_from_file_location("lm_eval_toxigen_utils", LM_EVAL_TASKS / "toxigen" / "utils.py")
    utils = importlib.util.module_from_spec(location)
    location.loader.exec_module(utils)
    rows = [{"text": "x", "target_group": "g", "toxicity_ai": ai, "toxicity_human": human}
            for ai, human in [(1.0, 1.0), (2.75, 2.75), (2.75, 2.76), (5.0, 4.2), (3.0, 2.0)]]
    docs = get_task("toxigen").hub.convert(rows, "test")
    assert [d.fields["label"] for d in docs] == [int(utils.doc_to_target(row)) for row in rows]

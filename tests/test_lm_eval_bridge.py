"""The lm-evaluation-harness bridge: EditkitLM under lm-eval, and ``lm_eval:<task>`` in a study.

Offline: the tasks are the YAMLs of ``tests/fixtures/lm_eval_task`` over the first 12
packaged CommonsenseQA dev questions (``dataset_path: json``; ``data_files`` are relative
to the working directory, so each test that loads one runs there). Every number lm-eval
reports through the bridge is checked against editkit's own engine and against plain
forward passes of ``lm.model`` written out here.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import editkit
from editkit.grid import StudyConfig
from editkit.results import load_results
from editkit.runs import run_study

lm_eval = pytest.importorskip("lm_eval")  # installed by `make test` (the lm_eval extra)

from lm_eval.api.instance import Instance  # noqa: E402

from editkit.lm_eval_bridge import EditkitLM  # noqa: E402
from editkit.lm_eval_tasks import UnknownLmEvalTaskError, check_task, evaluate_task, task_manager  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "lm_eval_task"
CLOZE, GEN, ROLLING = "editkit_csqa_cloze", "editkit_csqa_gen", "editkit_csqa_rolling"
DOCS = [json.loads(line) for line in (FIXTURE / "csqa_dev_12.jsonl").read_text().splitlines()]
# As tests/test_editor_contract.py's FAST_SMOLLM2 and tests/test_serac.py's FAST: a few optimisation steps.
FAST_ROME = {"v_num_grad_steps": 10, "context_template_length_params": [[5, 2]]}
FAST_SERAC = {"encoder": "all-minilm-l6-v2", "steps": 4, "batch_size": 4, "train_records": 16, "val_records": 4,
              "checkpoint_every": 2}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path_factory):
    """Run where the fixtures' data files are, with the hub off and a private datasets cache."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.chdir(FIXTURE)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf-datasets")


def plain_logprob(lm, context_ids, continuation_ids) -> float:
    """log P(continuation | context) from one unbatched forward pass of ``lm.model`` over both."""
    ids = torch.tensor([[*context_ids, *continuation_ids]])
    with torch.inference_mode():
        logprobs = lm.model(ids).logits[0].float().log_softmax(-1)
    start = len(context_ids)
    return math.fsum(logprobs[start - 1 + i, token].item() for i, token in enumerate(continuation_ids))


def plain_pair_logprob(lm, context: str, continuation: str) -> float:
    """lm-eval's ``_encode_pair`` by hand: the continuation is the tail of the whole text's ids."""
    context_ids = lm.tokenizer(context)["input_ids"]
    whole = lm.tokenizer(context + continuation)["input_ids"]
    assert whole[: len(context_ids)] == context_ids
    return plain_logprob(lm, context_ids, whole[len(context_ids):])


def plain_greedy(lm, context: str, stop: str, max_new_tokens: int) -> str:
    """Greedy decoding one token at a time, a full forward pass per token, cut before ``stop``."""
    ids = lm.tokenizer(context)["input_ids"]
    eos = {lm.tokenizer.eos_token_id, *([lm.model.generation_config.eos_token_id] if isinstance(
        lm.model.generation_config.eos_token_id, int) else lm.model.generation_config.eos_token_id or [])}
    new: list[int] = []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            token = int(lm.model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if token in eos:
                break
            new.append(token)
            if stop in lm.tokenizer.decode(new, skip_special_tokens=True):
                break
    return lm.tokenizer.decode(new, skip_special_tokens=True).split(stop)[0]


def instances(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, args, index) for index, args in enumerate(arguments)]


def test_simple_evaluate_equals_the_engine_and_plain_forward_passes(smollm2):
    results = lm_eval.simple_evaluate(model=EditkitLM(smollm2, batch_size=4), tasks=[CLOZE],
                                      task_manager=task_manager(FIXTURE), log_samples=True, bootstrap_iters=0,
                                      random_seed=None, numpy_random_seed=None, torch_random_seed=None)
    samples = sorted(results["samples"][CLOZE], key=lambda sample: sample["doc_id"])
    assert len(samples) == len(DOCS) == 12
    bridge = [[response[0] for response in sample["filtered_resps"]] for sample in samples]

    # editkit's own task on the same items: the same prompts, log-likelihoods and accuracy.
    items = editkit.evaluate(smollm2, "commonsense_qa_cloze", limit=12, num_fewshot=0, progress=False)
    assert list(items["prompt"]) == [sample["arguments"][0][0] for sample in samples]
    for ours, theirs in zip(items["logprobs"], bridge):
        assert ours == pytest.approx(theirs, abs=1e-4)

    # Plain forward passes of every (context, continuation) lm-eval asked for.
    plain = [[plain_pair_logprob(smollm2, *argument) for argument in sample["arguments"]] for sample in samples]
    for by_hand, theirs in zip(plain, bridge):
        assert by_hand == pytest.approx(theirs, abs=1e-4)
    gold = [doc["choices"]["label"].index(doc["answerKey"]) for doc in DOCS]
    hand_acc = sum(max(range(len(lls)), key=lls.__getitem__) == g for lls, g in zip(plain, gold)) / len(gold)
    acc = results["results"][CLOZE]["acc,none"]
    assert acc == hand_acc == items["correct"].mean()
    assert 0 < acc < 1, "a task the model neither always passes nor always fails"


def test_loglikelihood_rolling_equals_plain_forward_passes(smollm2):
    texts = [DOCS[0]["question"], DOCS[1]["question"] + " " + DOCS[2]["question"]]
    bridge = EditkitLM(smollm2).loglikelihood_rolling(instances("loglikelihood_rolling", [(t,) for t in texts]))
    bos = smollm2.tokenizer.bos_token_id
    for text, value in zip(texts, bridge):
        ids = smollm2.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert value == pytest.approx(plain_logprob(smollm2, [bos], ids), abs=1e-4)

    # Windows of at most 8 tokens: every token is predicted once, with lm-eval's contexts.
    short = EditkitLM(smollm2, max_length=8)
    ids = smollm2.tokenizer(texts[1], add_special_tokens=False)["input_ids"]
    windows = short.rolling_windows(texts[1])
    assert len(windows) > 2 and [t for _, cont in windows for t in cont] == ids
    assert all(len(context) + len(cont) <= 9 for context, cont in windows)
    (value,) = short.loglikelihood_rolling(instances("loglikelihood_rolling", [(texts[1],)]))
    assert value == pytest.approx(math.fsum(plain_logprob(smollm2, c, t) for c, t in windows), abs=1e-4)
    assert value < bridge[1] - 1.0, "short windows see less context than one window of the whole text"
    with pytest.raises(ValueError, match="at least one context token"):
        short.engine.score_tokens([([], ids)])


def test_generate_until_equals_plain_greedy_decoding(smollm2):
    contexts = [f"Q: {doc['question'].strip()}\nA:" for doc in DOCS[:6]]
    requests = instances("generate_until", [(c, {"until": ["\n"], "max_gen_toks": 8, "do_sample": False})
                                            for c in contexts])
    outputs = EditkitLM(smollm2, batch_size=3).generate_until(requests)
    assert outputs == [plain_greedy(smollm2, context, "\n", 8) for context in contexts]
    assert sum(bool(output.strip()) for output in outputs) >= 3, "most contexts get an answer"
    with pytest.raises(ValueError, match="decodes greedily"):
        EditkitLM(smollm2).generate_until(instances("generate_until", [(contexts[0], {"do_sample": True})]))


def test_evaluate_task_rows_for_choice_generation_and_perplexity_tasks(smollm2):
    lm = EditkitLM(smollm2, batch_size=4)
    cloze = evaluate_task(lm.engine, f"lm_eval:{CLOZE}", 6, include=FIXTURE)
    items = cloze.items
    assert list(items["item_id"]) == [str(i) for i in range(6)] and set(items["task"]) == {f"lm_eval:{CLOZE}"}
    assert list(items["target"]) == [doc["choices"]["label"].index(doc["answerKey"]) for doc in DOCS[:6]]
    assert list(items["correct"]) == [float(p == t) for p, t in zip(items["prediction"], items["target"])]
    assert set(items["lm_eval_metric"]) == {"acc,none"} and "correct_norm" in items
    assert items["task_version"].iloc[0] == f"1.0 (lm-eval {lm_eval.__version__})"
    assert cloze.scores.empty, "accuracy comes from editkit's aggregate of the rows"

    gen = evaluate_task(lm.engine, f"lm_eval:{GEN}", 6, include=FIXTURE).items
    contexts = [f"Q: {doc['question'].strip()}\nA:" for doc in DOCS[:6]]
    assert list(gen["output"]) == lm.generate_until(instances("generate_until", [
        (c, {"until": ["\n"], "max_gen_toks": 8, "do_sample": False}) for c in contexts]))
    assert list(gen["prediction"]) == [output.strip() for output in gen["output"]]
    answers = [doc["choices"]["text"][doc["choices"]["label"].index(doc["answerKey"])] for doc in DOCS[:6]]
    assert list(gen["correct"]) == [float(p == a) for p, a in zip(gen["prediction"], answers)]

    rolling = evaluate_task(lm.engine, f"lm_eval:{ROLLING}", 6, include=FIXTURE)
    texts = [doc["question"] for doc in DOCS[:6]]
    lls = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(t,) for t in texts]))
    words = sum(len(text.split()) for text in texts)
    row = rolling.scores.set_index("metric").loc["word_perplexity"]
    assert row["value"] == pytest.approx(math.exp(-math.fsum(lls) / words), rel=1e-6)
    assert row["ci_low"] < row["value"] < row["ci_high"] and row["n"] == 6
    assert set(rolling.scores["metric"]) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}


def test_a_study_measures_an_lm_eval_task_at_every_checkpoint(make_tiny, tmp_path, session_cache):
    root = tmp_path / "study"
    config = StudyConfig.from_dict(dict(
        model="tiny", methods=["ft"], n_edits=2, checkpoints=[0, 2],
        editor_overrides={"ft": {"layers": [1], "num_steps": 3}},
        tasks=[f"lm_eval:{CLOZE}", f"lm_eval:{ROLLING}"], lm_eval_include=str(FIXTURE), limit=5,
        max_new_tokens=4, n_generation_examples=1, results_dir=str(root)))
    run_study(config, progress=False, lm=make_tiny("llama"))
    results = load_results(root)
    scores = results.scores.set_index(["task", "metric", "n_edits"])
    for n_edits in (0, 2):
        acc = scores.loc[(f"lm_eval:{CLOZE}", "acc", n_edits)]
        assert acc["n"] == 5 and acc["ci_low"] <= acc["value"] <= acc["ci_high"]
        ppl = scores.loc[(f"lm_eval:{ROLLING}", "word_perplexity", n_edits)]
        assert ppl["n"] == 5 and ppl["ci_low"] < ppl["value"] < ppl["ci_high"]
    cloze_items = results.items[results.items["task"] == f"lm_eval:{CLOZE}"]
    assert sorted(cloze_items.groupby("n_edits").size().items()) == [(0, 5), (2, 5)]
    deltas = results.deltas[results.deltas["task"] == f"lm_eval:{CLOZE}"].set_index("metric")
    assert set(deltas.index) == {"loglik", "prob", "acc"} and (deltas["n_items"] == 5).all()
    assert deltas.loc["loglik", "delta"] != 0, "three FT steps move the gold log-likelihood"


def test_an_edit_is_seen_through_the_bridge(smollm2, session_cache):
    request = editkit.load_counterfact("edit", 1)[0]
    bridge = EditkitLM(smollm2, batch_size=1)
    asked = instances("loglikelihood", [(request.prompt, " " + request.target_new)])
    text = instances("loglikelihood_rolling", [(f"{request.prompt} {request.target_new}",)])
    before, rolled_before = bridge.loglikelihood(asked)[0][0], bridge.loglikelihood_rolling(text)[0]
    handle = editkit.get_editor("rome", smollm2, **FAST_ROME).edit(request)
    try:
        after, rolled_after = bridge.loglikelihood(asked)[0][0], bridge.loglikelihood_rolling(text)[0]
    finally:
        handle.restore()
    assert after > before + 1.0 and rolled_after > rolled_before + 1.0
    assert bridge.loglikelihood(asked)[0][0] == before, "restored weights, the same score"


@pytest.mark.parametrize("counterfactual", ["conditioned", "trained"])
def test_a_routing_editor_acts_through_the_bridge(make_tiny, session_cache, counterfactual):
    """Routed contexts are read by the edited model (conditioned) or by SERAC's trained counterfactual model."""
    from editkit.editors.trainer import train_editor

    lm = make_tiny("llama")
    settings = {**FAST_SERAC, "counterfactual": counterfactual}
    train_editor("serac", lm, progress=False, **settings)
    editor = editkit.get_editor("serac", lm, **settings)
    reader = editor.counterfactual or lm
    request = editkit.load_counterfact("edit", 2)[1]
    statement = f"{request.prompt} {request.target_new}"
    bridge = EditkitLM(lm, batch_size=2)
    asked = [(request.prompt, " " + request.target_new), ("The capital of Japan is", " Tokyo")]
    before = bridge.loglikelihood(instances("loglikelihood", asked))
    handle = editor.edit(request)
    try:
        after = bridge.loglikelihood(instances("loglikelihood", asked))
        (rolled,) = bridge.loglikelihood_rolling(instances("loglikelihood_rolling", [(request.prompt,)]))
    finally:
        handle.restore()
    assert after[0][0] == pytest.approx(plain_pair_logprob(reader, f"{statement}\n{request.prompt}",
                                                           " " + request.target_new), abs=1e-4)
    assert after[0][0] != pytest.approx(before[0][0], abs=1e-3) and after[1] == before[1]
    prompt_ids = lm.tokenizer(request.prompt, add_special_tokens=False)["input_ids"]
    by_hand = plain_logprob(reader, lm.tokenizer(f"{statement}\n")["input_ids"], prompt_ids)
    assert rolled == pytest.approx(by_hand, abs=1e-4), "a routed text is conditioned on the edit"


def test_unknown_lm_eval_tasks_and_bad_includes_fail_when_the_study_is_read():
    with pytest.raises(UnknownLmEvalTaskError, match=r"did you mean lm_eval:editkit_csqa_cloze"):
        StudyConfig.from_dict({"tasks": ["lm_eval:editkit_csqa_clozee"], "lm_eval_include": str(FIXTURE)})
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        StudyConfig.from_dict({"tasks": [f"lm_eval:{CLOZE}"], "lm_eval_include": str(FIXTURE / "missing")})
    with pytest.raises(ValueError, match="no task is an lm-eval task"):
        StudyConfig.from_dict({"tasks": ["mmlu_cloze"], "lm_eval_include": str(FIXTURE)})
    assert check_task("lm_eval:hellaswag", FIXTURE) == "hellaswag", "lm-eval's own tasks stay known"
    config = StudyConfig.from_dict({"tasks": [f"lm_eval:{CLOZE}"], "lm_eval_include": str(FIXTURE)})
    assert config.cells()[0].identity()["lm_eval_include"] == str(FIXTURE)


def test_editkit_imports_without_lm_eval_and_the_bridge_names_the_extra(monkeypatch):
    code = "import sys, editkit, editkit.grid, editkit.protocol, editkit.lm_eval_tasks; print('lm_eval' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
    for name in [name for name in sys.modules if name == "lm_eval" or name.startswith("lm_eval.")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    monkeypatch.delitem(sys.modules, "editkit.lm_eval_bridge")
    with pytest.raises(ImportError, match=r"pip install 'editkit\[lm_eval\]'"):
        import editkit.lm_eval_bridge  # noqa: F401
    with pytest.raises(ImportError, match=r"pip install 'editkit\[lm_eval\]'"):
        check_task(f"lm_eval:{CLOZE}", FIXTURE)

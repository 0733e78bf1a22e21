"""Engine contracts: lm-eval tokenisation, exact batching, logits, generation, non-finite logits;
batch planning and automatic batch size; result rows (format failures, versions), constant-answer
share and paired deltas.

Tiny random GPT-2 (absolute positions), Llama and Gemma 3 (sliding-window
layers) are built from configs and share SmolLM2's tokenizer; the real-model
checks use the embedded SmolLM2 (loaded once per module).
"""

from __future__ import annotations

import copy
import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from editkit import load_model
from editkit.adapters import get_adapter
from editkit.benchmarks import (
    ContinuationScore,
    Engine,
    GenerationRequest,
    LanguageModel,
    aggregate,
    constant_answer,
    evaluate,
    get_task,
    paired_deltas,
)
from editkit.benchmarks.passes import auto_batch_size, bytes_per_sequence, plan_batches, sliding_window
from editkit.models import LoadedModel

SHOTS = "Q: What is one plus one?\nA: two\n\nQ: What is two plus two?\nA: four\n\nQ: What is three plus three?\nA: six\n\n"

REQUESTS = [
    ("The capital of France is", " Paris"),
    ("The capital of France is", " Rome, of course"),
    ("The capital of France is ", "Lyon"),  # trailing space moves to the continuation
    ("Hi", " there my friend, how are you today?"),
    ("A much longer context that goes on and on about many different things, one after another", " yes"),
    ("", "Hello world"),
    ("Question: 2+2?\nAnswer:", " 4"),
    ("Question: 2+2?\nAnswer:", " four"),
    # A shared few-shot prefix: the engine runs it once per batch.
    (SHOTS + "Q: What is four plus four?\nA:", " eight"),
    (SHOTS + "Q: What is four plus four?\nA:", " nine or ten"),
    (SHOTS + "Q: What is five plus five, my dear friend?\nA:", " ten"),
    (SHOTS + "Q: What is six plus six?\nA:", " twelve"),
]

GENERATIONS = [
    GenerationRequest("The capital of France is", ("\n",), 12),
    GenerationRequest("Once upon a time", (".",), 20),
    GenerationRequest("Hi", (), 5),
    GenerationRequest("Question: what is 2+2?\nAnswer:", ("\n\n", "Question:"), 9),
    GenerationRequest("", (), 4),
    GenerationRequest(SHOTS + "Q: What is four plus four?\nA:", ("\n",), 6),
    GenerationRequest(SHOTS + "Q: What is five plus five, my dear friend?\nA:", ("\n",), 8),
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def smollm2() -> LoadedModel:
    return load_model()


def _tiny(kind: str, tokenizer) -> LoadedModel:
    torch.manual_seed(0)
    vocab = len(tokenizer)
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=256, n_embd=32, n_layer=2, n_head=2,
                                           **special))
    elif kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=256, **special))
    else:  # window 4 < the contexts: sliding cache layers, left padding; window 256: the shared-prefix path
        model = Gemma3ForCausalLM(Gemma3TextConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
            sliding_window=4 if kind == "gemma3" else 256,
            layer_types=["sliding_attention", "full_attention"], **special))
    model.eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=get_adapter(model.config.model_type), name=kind)


@pytest.fixture(scope="module", params=["gpt2", "llama", "gemma3", "gemma3_wide"])
def tiny(request, smollm2) -> LoadedModel:
    return _tiny(request.param, smollm2.tokenizer)


def _manual_logprob(lm: LoadedModel, context_ids: list[int], continuation_ids: list[int]) -> float:
    """Sum of continuation log-probs from one unpadded forward pass over the whole sequence."""
    with torch.no_grad():
        logits = lm.model(torch.tensor([context_ids + continuation_ids])).logits[0].double()
    logprobs = logits.log_softmax(-1)
    return sum(logprobs[len(context_ids) - 1 + j, token].item() for j, token in enumerate(continuation_ids))


def _assert_same_scores(first: list[ContinuationScore], second: list[ContinuationScore], tol: float = 1e-4) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.target_tokens == b.target_tokens
        assert a.logprob == pytest.approx(b.logprob, abs=tol)
        assert a.greedy_tokens == b.greedy_tokens
        assert a.is_greedy == b.is_greedy


def test_engine_is_a_language_model(smollm2):
    assert isinstance(Engine(smollm2, progress=False), LanguageModel)


def test_encode_pair_follows_lm_eval(smollm2):
    engine = Engine(smollm2, progress=False)
    encode = engine.encode
    context, continuation = engine.encode_pair("Answer: ", "B")
    assert (context, continuation) == engine.encode_pair("Answer:", " B")
    assert context == encode("Answer:")
    assert continuation == encode("Answer: B")[len(encode("Answer:")) :]
    assert encode("Answer:")[0] != smollm2.tokenizer.bos_token_id  # SmolLM2 adds no BOS
    context, continuation = engine.encode_pair("", "Hello")
    assert context == [smollm2.tokenizer.bos_token_id]
    assert continuation == smollm2.tokenizer("Hello", add_special_tokens=False)["input_ids"]


def test_batched_equals_unbatched_tiny(tiny):
    batched = Engine(tiny, batch_size=8, progress=False).score(REQUESTS)
    single = Engine(tiny, batch_size=1, progress=False)
    _assert_same_scores(batched, single.score(REQUESTS))
    single.share_context = False
    _assert_same_scores(batched, single.score(REQUESTS))
    plain = Engine(tiny, batch_size=8, progress=False)
    plain.share_prefix = False
    _assert_same_scores(batched, plain.score(REQUESTS))
    assert [s.n_chars for s in batched] == [len(c) for _, c in REQUESTS]


def test_shared_prefix_saves_tokens(tiny):
    def tokens_run(share_prefix: bool) -> int:
        engine = Engine(tiny, batch_size=8, progress=False)
        engine.share_prefix = share_prefix
        forward, total = engine.forward, []
        engine.forward = lambda input_ids, *args, **kwargs: total.append(input_ids.numel()) or forward(
            input_ids, *args, **kwargs)
        engine.score(REQUESTS[-4:])
        return sum(total)

    shared, plain = tokens_run(True), tokens_run(False)
    assert shared < plain if sliding_window(tiny.model.config) in (None, 256) else shared == plain


def test_scores_equal_direct_logits(tiny):
    engine = Engine(tiny, batch_size=4, progress=False)
    for score, (context, continuation) in zip(engine.score(REQUESTS), REQUESTS):
        context_ids, continuation_ids = engine.encode_pair(context, continuation)
        assert score.logprob == pytest.approx(_manual_logprob(tiny, context_ids, continuation_ids), abs=1e-4)
        assert score.n_tokens == len(continuation_ids) == len(score.token_logprobs)
        assert score.finite
        assert math.fsum(score.token_logprobs) == pytest.approx(score.logprob)


def test_loglikelihood_matches_score(tiny):
    engine = Engine(tiny, progress=False)
    pairs = engine.loglikelihood(REQUESTS)
    assert pairs == [(s.logprob, s.is_greedy) for s in engine.score(REQUESTS)]


def test_greedy_flag_matches_argmax(tiny):
    engine = Engine(tiny, progress=False)
    context = "The capital of France is"
    greedy = engine.generate_until([GenerationRequest(context, (), 3)])[0]
    score = engine.score([(context, greedy)])[0]
    if score.target_tokens == score.greedy_tokens:  # a re-tokenisation can differ from the generated ids
        assert score.is_greedy


def test_left_truncation(tiny):
    engine = Engine(tiny, max_length=8, progress=False)
    context, continuation = "one two three four five six seven eight nine ten", " eleven"
    score = engine.score([(context, continuation)])[0]
    context_ids, continuation_ids = engine.encode_pair(context, continuation)
    kept = (context_ids + continuation_ids)[-9:]  # lm-eval keeps max_length + 1 tokens
    expected = _manual_logprob(tiny, kept[: len(kept) - len(continuation_ids)], continuation_ids)
    assert score.logprob == pytest.approx(expected, abs=1e-4)


def test_generation_batched_equals_unbatched_tiny(tiny):
    batched = Engine(tiny, batch_size=8, progress=False).generate_until(GENERATIONS)
    single = Engine(tiny, batch_size=1, progress=False).generate_until(GENERATIONS)
    assert batched == single
    plain = Engine(tiny, batch_size=8, progress=False)
    plain.share_prefix = False
    assert plain.generate_until(GENERATIONS) == batched
    for request, text in zip(GENERATIONS, batched):
        assert not any(stop in text for stop in request.until)


def test_generation_budget_and_stop_strings(tiny):
    engine = Engine(tiny, progress=False)
    short, long = engine.generate_until([GenerationRequest("Once upon a time", (), 4),
                                         GenerationRequest("Once upon a time", (), 12)])
    assert long.startswith(short) and len(long) > len(short)  # greedy: a bigger budget extends the text
    stop = long[len(long) // 2 : len(long) // 2 + 2]
    (cut,) = engine.generate_until([GenerationRequest("Once upon a time", (stop,), 12)])
    assert cut == long[: long.index(stop)]


def test_generation_stops_at_eos(tiny):
    eos = tiny.tokenizer.eos_token_id

    def force_eos(module, inputs, output):
        output[..., eos] += 1e4
        return output

    handle = tiny.model.get_output_embeddings().register_forward_hook(force_eos)
    try:
        assert Engine(tiny, progress=False).generate_until([GenerationRequest("Hello", (), 10)]) == [""]
    finally:
        handle.remove()


def test_nan_weights_are_flagged_not_raised(tiny, caplog):
    broken = copy.deepcopy(tiny.model)
    broken.get_output_embeddings().weight.data[0, 0] = float("nan")  # every logit of token 0 becomes NaN
    lm = LoadedModel(model=broken, tokenizer=tiny.tokenizer, adapter=tiny.adapter, name="broken")
    engine = Engine(lm, progress=False)
    scores = engine.score(REQUESTS[:3])
    assert all(not s.finite and math.isnan(s.logprob) and not s.is_greedy for s in scores)
    with caplog.at_level(logging.WARNING, logger="editkit.benchmarks.engine"):
        assert engine.generate_until(GENERATIONS[:2]) == ["", ""]
    assert "non-finite" in caplog.text


def test_smollm2_batched_equals_unbatched(smollm2):
    requests = REQUESTS + [
        ("The Eiffel Tower is located in the city of", " Paris"),
        ("The Eiffel Tower is located in the city of", " Rome"),
    ]
    batched = Engine(smollm2, batch_size=8, progress=False).score(requests)
    single = Engine(smollm2, batch_size=1, progress=False)
    single.share_context = False
    _assert_same_scores(batched, single.score(requests))
    engine = Engine(smollm2, progress=False)
    for score, (context, continuation) in zip(batched, requests):
        context_ids, continuation_ids = engine.encode_pair(context, continuation)
        # A sum of float32 log-probabilities over ~30 tokens: the shared-prefix pass and the
        # plain pass accumulate in different orders, 1e-4 apart at -33 on some CPUs' kernels.
        manual = _manual_logprob(smollm2, context_ids, continuation_ids)
        assert score.logprob == pytest.approx(manual, rel=1e-5, abs=1e-4)
    paris, rome = batched[-2:]
    assert paris.logprob > rome.logprob


def test_smollm2_generation_batched_equals_unbatched(smollm2):
    requests = GENERATIONS[:4]
    batched = Engine(smollm2, batch_size=4, progress=False).generate_until(requests)
    assert batched == Engine(smollm2, batch_size=1, progress=False).generate_until(requests)
    assert "Paris" in batched[0]


# -- batch planning, automatic batch size, forward counts ------------------------------------------


def _count_forwards(engine: Engine) -> list[int]:
    """Record the number of input tokens of every forward pass the engine makes."""
    forward, calls = engine.forward, []
    engine.forward = lambda input_ids, *args, **kwargs: calls.append(input_ids.numel()) or forward(
        input_ids, *args, **kwargs)
    return calls


def test_batches_are_sorted_by_length():
    contexts = [[7] * n for n in (3, 9, 1, 12, 5, 4, 8)] + [[1, 2] * 20 + [n] for n in range(3)]
    plan = plan_batches(contexts, 3)
    assert sorted(i for batch, _ in plan for i in batch) == list(range(len(contexts)))
    for batch, shared in plan:
        lengths = [len(contexts[i]) for i in batch]
        assert lengths == sorted(lengths, reverse=True)
        assert shared < min(lengths)
    alone = [i for batch, shared in plan if shared == 0 for i in batch if i < 7]
    assert [len(contexts[i]) for i in alone] == sorted((len(c) for c in contexts[:7]), reverse=True)
    assert [shared for batch, shared in plan if 7 in batch] == [40]  # the three share 40 tokens


def test_single_token_choices_take_one_forward(tiny):
    engine = Engine(tiny, batch_size=8, progress=False)
    calls = _count_forwards(engine)
    context = "Question: which letter comes first?\nAnswer:"
    scores = engine.score([(context, f" {letter}") for letter in "ABCD"])
    assert len(calls) == 1 and all(s.n_tokens == 1 for s in scores)
    calls.clear()
    engine.score([(context, " A"), (context, " the letter A, clearly")])
    assert len(calls) == 2  # the context once, then the longer continuation on top of its cache


def test_auto_batch_size_is_exact_and_bounded(tiny):
    reference = Engine(tiny, batch_size=1, progress=False).score(REQUESTS)
    roomy = Engine(tiny, batch_size="auto", memory_cap=2**34, max_batch_size=5, progress=False)
    _assert_same_scores(roomy.score(REQUESTS), reference)
    assert roomy.last_batch_size == 5
    tight = Engine(tiny, batch_size="auto", memory_cap=1, progress=False)
    _assert_same_scores(tight.score(REQUESTS), reference)
    assert tight.last_batch_size == 1
    assert tight.generate_until(GENERATIONS[:3]) == Engine(tiny, batch_size=4, progress=False).generate_until(
        GENERATIONS[:3])
    default = Engine(tiny, batch_size="auto", progress=False)  # cap from the machine's available memory
    default.score(REQUESTS[:2])
    assert 1 <= default.last_batch_size <= default.max_batch_size


def test_memory_estimate_grows_with_length(tiny):
    config = tiny.model.config
    sizes = [bytes_per_sequence(config, 4, n, 1) for n in (16, 256, 4096)]
    assert sizes == sorted(sizes) and sizes[0] > 0
    per = bytes_per_sequence(config, 4, 256, 1)
    assert auto_batch_size(config, 4, 256, 1, cap_bytes=10 * per, max_batch_size=64) == 10
    assert auto_batch_size(config, 4, 256, 1, cap_bytes=per // 2, max_batch_size=64) == 1


@pytest.mark.parametrize("bad", [0, -3, 2.5, "big", True])
def test_bad_batch_size_is_rejected(tiny, bad):
    with pytest.raises(ValueError, match="batch_size"):
        Engine(tiny, batch_size=bad)


def test_generation_finishes_when_every_row_stopped(tiny):
    eos = tiny.tokenizer.eos_token_id
    engine = Engine(tiny, batch_size=8, progress=False)
    calls = _count_forwards(engine)

    def force_eos(module, inputs, output):
        output[..., eos] += 1e4
        return output

    handle = tiny.model.get_output_embeddings().register_forward_hook(force_eos)
    try:
        assert engine.generate_until([GenerationRequest("Hello", (), 200), GenerationRequest("Hi there", (), 200)]) \
            == ["", ""]
    finally:
        handle.remove()
    assert len(calls) == 1  # the contexts only: no decoding step once every row has met EOS


def test_generated_special_tokens_are_not_in_the_text(tiny):
    special = tiny.tokenizer.bos_token_id  # a special token other than EOS

    def force_special(module, inputs, output):
        output[..., special] += 1e4
        return output

    handle = tiny.model.get_output_embeddings().register_forward_hook(force_special)
    try:
        (text,) = Engine(tiny, progress=False).generate_until([GenerationRequest("Hello", (), 3)])
    finally:
        handle.remove()
    assert text == ""  # decoded as lm-eval does, without special tokens


def test_progress_bars(tiny, capsys):
    engine = Engine(tiny, progress=True)
    engine.score(REQUESTS[:2])
    engine.generate_until(GENERATIONS[:1])
    err = capsys.readouterr().err
    assert "loglikelihood" in err and "generate" in err


# -- result rows and aggregates --------------------------------------------------------------------


class _Constant:
    """A fake LanguageModel that always prefers the second choice and always answers ``text``."""

    name = "constant"

    def __init__(self, text: str = "") -> None:
        self.text = text

    def loglikelihood(self, requests):
        out, previous, k = [], None, 0
        for context, _ in requests:
            k = k + 1 if context == previous else 0
            previous = context
            out.append((0.0 if k == 1 else -1.0 - k, k == 1))
        return out

    def generate_until(self, requests):
        return [self.text for _ in requests]


def test_rows_have_format_failure_and_version():
    items = evaluate(_Constant(" so 3 + 4 = 7\n#### 7"), ["mmlu", "gsm8k"], limit=6)
    assert {"format_failure", "unusable", "task_version"} <= set(items.columns)
    assert (items["format_failure"] == items["unusable"]).all()
    assert not items.loc[items["task"] == "mmlu", "format_failure"].any()
    assert (items["task_version"] == [get_task(t).version for t in items["task"]]).all()
    broken = evaluate(_Constant("7 " * 60), "gsm8k", limit=3)  # an answer is extractable but degenerate
    assert broken["format_failure"].all() and broken["prediction_flexible"].notna().all()


def test_constant_answer_share():
    items = evaluate(_Constant("#### 7"), ["mmlu", "gsm8k"], limit=20)
    metrics = aggregate(items, n_boot=200).set_index(["task", "metric"])
    for task in ("mmlu", "gsm8k"):
        row = metrics.loc[(task, "constant_answer_share")]
        assert row["value"] == 1.0 and row["n"] == 20 and row["ci_low"] == row["ci_high"] == 1.0
    assert metrics.loc[("gsm8k", "format_failure_rate"), "value"] == 0.0
    assert not any(m == "constant_answer_share" for t, m in metrics.index if "/" in t)
    table = constant_answer(items).set_index("task")
    assert table.loc["mmlu", "prediction"] == "1" and table.loc["gsm8k", "prediction"] == "'7'"
    mixed = pd.DataFrame({"task": ["t"] * 4, "prediction": [0, 0, 1, -1], "correct": [1, 1, 0, 0]})
    row = aggregate(mixed, n_boot=300).set_index("metric").loc["constant_answer_share"]
    assert row["value"] == 0.5 and row["ci_low"] < 0.5 < row["ci_high"]  # -1 (no answer) counts only in n


def test_paired_deltas():
    rng = np.random.default_rng(0)
    n = 400
    subjects = np.repeat(["a", "b", "c", "d"], n // 4)
    base = pd.DataFrame({"task": "t", "task_version": "1", "item_id": [str(i) for i in range(n)],
                         "subject": subjects, "correct": rng.random(n) < 0.6, "format_failure": False})
    edited = base.copy()
    flip = rng.choice(n, 40, replace=False)
    edited.loc[flip, "correct"] = False
    edited.loc[flip[:10], "format_failure"] = True
    deltas = paired_deltas(edited.sample(frac=1, random_state=1), base, n_boot=500).set_index("metric")
    expected = edited["correct"].mean() - base["correct"].mean()
    acc = deltas.loc["acc"]
    assert acc["value"] == pytest.approx(expected) and acc["n"] == n
    assert acc["edited"] == pytest.approx(edited["correct"].mean()) and acc["base"] == pytest.approx(
        base["correct"].mean())
    assert acc["ci_low"] <= acc["value"] <= acc["ci_high"] < 0
    # The paired interval is narrower than that of one mean alone (let alone of a difference of two).
    separate = aggregate(base, n_boot=500).set_index(["task", "metric"]).loc[("t", "acc")]
    assert acc["ci_high"] - acc["ci_low"] < separate["ci_high"] - separate["ci_low"]
    assert deltas.loc["format_failure_rate", "value"] == pytest.approx(10 / n)
    macro = deltas.loc["acc_macro"]
    per_subject = edited.groupby("subject")["correct"].mean() - base.groupby("subject")["correct"].mean()
    assert macro["value"] == pytest.approx(per_subject.mean())
    same = paired_deltas(base, base, n_boot=100).set_index("metric").loc["acc"]
    assert same["value"] == same["ci_low"] == same["ci_high"] == 0.0
    assert paired_deltas(edited, base, n_boot=100, seed=3).equals(paired_deltas(edited, base, n_boot=100, seed=3))
    partial = paired_deltas(edited.iloc[:100], base, n_boot=100).set_index("metric")
    assert partial.loc["acc", "n"] == 100
    with pytest.raises(ValueError, match="version"):
        paired_deltas(edited.assign(task_version="2"), base)
    with pytest.raises(ValueError, match="item_id"):
        paired_deltas(edited.drop(columns="item_id"), base)


def test_evaluate_with_auto_batch_size(tiny):
    items = evaluate(tiny, "mmlu", limit=3, num_fewshot=1, batch_size="auto", progress=False)
    fixed = evaluate(tiny, "mmlu", limit=3, num_fewshot=1, batch_size=1, progress=False)
    assert list(items["prediction"]) == list(fixed["prediction"])
    assert np.allclose(np.array(list(items["logprobs"])), np.array(list(fixed["logprobs"])), atol=1e-4)


def test_memory_budget_asks_the_device_backend_or_system_memory(monkeypatch):
    import psutil

    from editkit.benchmarks.passes import memory_budget

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (1000, 4000))
    assert memory_budget(torch.device("cuda", 0)) == 800, "0.8 of what the backend reports free"
    assert memory_budget(torch.device("cuda", 0), fraction=0.5) == 500
    available = psutil.virtual_memory().available
    assert abs(memory_budget(torch.device("cpu")) - available // 2) < 0.05 * available

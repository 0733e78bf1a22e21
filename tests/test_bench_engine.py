"""Engine contracts: lm-eval tokenisation, exact batching, logits, generation, non-finite logits.

Tiny random GPT-2 (absolute positions), Llama and Gemma 3 (sliding-window
layers) are built from configs and share SmolLM2's tokenizer; the real-model
checks use the embedded SmolLM2 (loaded once per module).
"""

from __future__ import annotations

import copy
import logging
import math

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
from editkit.benchmarks import ContinuationScore, Engine, GenerationRequest, LanguageModel
from editkit.benchmarks.passes import sliding_window
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
        assert score.logprob == pytest.approx(_manual_logprob(smollm2, context_ids, continuation_ids), abs=1e-4)
    paris, rome = batched[-2:]
    assert paris.logprob > rome.logprob


def test_smollm2_generation_batched_equals_unbatched(smollm2):
    requests = GENERATIONS[:4]
    batched = Engine(smollm2, batch_size=4, progress=False).generate_until(requests)
    assert batched == Engine(smollm2, batch_size=1, progress=False).generate_until(requests)
    assert "Paris" in batched[0]

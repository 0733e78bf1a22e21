"""Knowledge Neurons: integrated-gradients attribution, neuron selection, the value-slot edit."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import editkit
from editkit.datasets import load_counterfact
from editkit.editors import resolve_params
from editkit.editors.kn import Attribution, KnowledgeNeuronsParams, integrated_gradients, select_neurons
from editkit.tokens import encode, encode_pair
from editkit.types import EditRequest
from tests.helpers import target_logprob

# Fast settings for the contract tests. On random models with untied embeddings or gated
# MLPs the reference recipe moves the target either way, and on SmolLM2 its subtraction of
# the greedy answer lowers the target too; with these switches the target rises on every
# tiny architecture tried (and on the first CounterFact records of SmolLM2).
FAST = dict(steps=2, batch_size=64, embedding="output", activation_sign=True, original_scale=0.0)
REQUEST = EditRequest("The Eiffel Tower is located in the city of", "The Eiffel Tower", "Rome", "Paris",
                      rephrase_prompts=("Where is the Eiffel Tower? It is in",), case_id="t")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def snapshot(lm) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def probability_with_layer_scaled(lm, prompt: str, token: int, layer: int, alpha: float) -> float:
    """P(token | prompt) with the last token's input of layer's output projection scaled by alpha."""

    def hook(module, args):
        value = args[0].reshape(1, -1, args[0].shape[-1]).clone()
        value[:, -1] = value[:, -1] * alpha
        return (value.reshape(args[0].shape),)

    handle = lm.adapter.module(lm.model, "mlp_out", layer).register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            logits = lm.model(torch.tensor([encode(lm.tokenizer, prompt)])).logits
    finally:
        handle.remove()
    return float(logits[0, -1].float().softmax(-1)[token])


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt"])
def test_attribution_shape_and_completeness(make_tiny, model_type):
    lm = make_tiny(model_type)
    original = snapshot(lm)
    token = encode_pair(lm.tokenizer, REQUEST.prompt, " Paris")[1][0]
    attribution = integrated_gradients(lm, REQUEST.prompt, token, [0, 1, 2], steps=200, batch_size=128)
    d_mlp = lm.adapter.as_out_in(lm.adapter.weight(lm.model, "mlp_out", 0)).shape[1]
    assert attribution.scores.shape == (3, d_mlp) and attribution.layers == (0, 1, 2)
    assert attribution.token == token
    assert attribution.probability == pytest.approx(probability_with_layer_scaled(lm, REQUEST.prompt, token, 0, 1.0),
                                                    rel=1e-4)
    for layer in range(3):
        full = probability_with_layer_scaled(lm, REQUEST.prompt, token, layer, 1.0)
        zero = probability_with_layer_scaled(lm, REQUEST.prompt, token, layer, 0.0)
        total = float(attribution.scores[layer].sum())
        # Completeness of integrated gradients along the straight path from the zero baseline.
        assert total == pytest.approx(full - zero, rel=0.02, abs=1e-3 * abs(full - zero)), (layer, total, full - zero)
    for name, tensor in lm.model.state_dict().items():
        assert torch.equal(tensor, original[name]), f"attribution changed {name}"


def test_batching_does_not_change_attribution(make_tiny):
    lm = make_tiny("llama")
    one = integrated_gradients(lm, REQUEST.prompt, None, [0, 2], steps=6, batch_size=1)
    many = integrated_gradients(lm, REQUEST.prompt, None, [0, 2], steps=6, batch_size=12)
    assert one.token == one.prediction == many.token
    torch.testing.assert_close(one.scores, many.scores, rtol=1e-4, atol=1e-12)


def _attribution(scores: list[list[float]], layers=(0, 1)) -> Attribution:
    scores = torch.tensor(scores)
    return Attribution(scores=scores, layers=tuple(layers), activations=torch.ones_like(scores), token=0,
                       probability=0.5, prediction=0)


def test_selection_threshold_refine_and_cap():
    a = _attribution([[1.0, 0.1, 0.3], [0.25, -2.0, 0.0]])
    b = _attribution([[0.5, 0.0, 1.0], [0.0, 0.0, 0.1]])
    neurons, coarse = select_neurons([a], 0.2, 0.4, refine=False)
    assert neurons == [(0, 0), (0, 2), (1, 0)] and coarse == [3]  # strictly above 0.2 * max
    union, coarse = select_neurons([a, b], 0.2, 0.4, refine=False)
    assert union == [(0, 0), (0, 2), (1, 0)] and coarse == [3, 2]
    shared, _ = select_neurons([a, b], 0.2, 0.5, refine=True)  # found for more than half the prompts
    assert shared == [(0, 0), (0, 2)]
    capped, _ = select_neurons([a, b], 0.2, 0.4, refine=False, max_neurons=1)
    assert capped == [(0, 0)]  # highest mean attribution (0.75 against 0.65)
    assert select_neurons([_attribution([[-1.0, 0.0]], layers=(3,))], 0.2, 0.4, False) == ([], [0])


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_edit_changes_only_the_selected_value_slots(make_tiny, model_type):
    lm = make_tiny(model_type)
    original = snapshot(lm)
    editor = editkit.get_editor("kn", lm, steps=3, batch_size=64, lr_scale=2.0)
    handle = editor.edit(REQUEST)
    info = handle.info[0]
    assert info["n_neurons"] > 0 and info["n_prompts"] == 1
    embed = lm.adapter.weight(lm.model, "embed").detach()
    expected = 2.0 * embed[info["target_token"]]
    if info["original_token"] != info["target_token"]:  # lr_scale * (E[new] - 2 E[greedy])
        expected = expected - 4.0 * embed[info["original_token"]]
    selected: dict[str, list[int]] = {}
    for layer, neuron in info["neurons"]:
        selected.setdefault(lm.adapter.weight_path("mlp_out", layer), []).append(neuron)
    assert sorted(handle.paths) == sorted(selected)
    for name, tensor in lm.model.state_dict().items():
        if name not in selected:
            assert torch.equal(tensor, original[name]), f"{name} changed"
            continue
        delta = lm.adapter.as_out_in(tensor - original[name])
        columns = selected[name]
        untouched = [c for c in range(delta.shape[1]) if c not in columns]
        assert torch.equal(delta[:, untouched], torch.zeros_like(delta[:, untouched]))
        torch.testing.assert_close(delta[:, columns], expected[:, None].expand(-1, len(columns)),
                                   rtol=1e-4, atol=1e-5)
    handle.restore()


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_target_rises_restore_is_bit_exact_and_deterministic(make_tiny, model_type):
    lm = make_tiny(model_type)
    original = snapshot(lm)
    before = target_logprob(lm, REQUEST.prompt, REQUEST.target_new)
    results = []
    for _ in range(2):
        editor = editkit.get_editor("kn", lm, **FAST)
        handle = editor.edit(REQUEST)
        assert target_logprob(lm, REQUEST.prompt, REQUEST.target_new) > before
        results.append({p: lm.model.get_parameter(p).detach().clone() for p in handle.paths})
        handle.restore()
        for name, tensor in lm.model.state_dict().items():
            assert torch.equal(tensor, original[name]), f"{name} not restored bit-exactly"
    assert results[0].keys() == results[1].keys()
    assert all(torch.equal(results[0][p], results[1][p]) for p in results[0]), "the edit must be deterministic"


def test_refine_uses_rephrases_and_batches_apply_in_order(make_tiny):
    lm = make_tiny("gpt2")
    refined = editkit.get_editor("kn", lm, refine=True, p=0.5, **FAST).edit(REQUEST)
    assert refined.info[0]["n_prompts"] == 2 and len(refined.info[0]["coarse"]) == 2
    refined.restore()
    second = EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", None,
                         case_id="d")
    editor = editkit.get_editor("kn", lm, **FAST)
    together = editor.edit([REQUEST, second])
    assert [i["case_id"] for i in together.info] == ["t", "d"]
    joint = {p: lm.model.get_parameter(p).detach().clone() for p in together.paths}
    together.restore()
    first = editor.edit(REQUEST)
    then = editor.edit(second)
    assert then.info[0]["answer_token"] == then.info[0]["original_token"]  # no target_true: its own answer
    assert sorted(set(first.paths) | set(then.paths)) == sorted(joint)
    assert all(torch.equal(lm.model.get_parameter(p), joint[p]) for p in joint)
    then.restore()
    first.restore()


def test_params_defaults_configs_and_validation(make_tiny):
    params = KnowledgeNeuronsParams()
    assert (params.steps, params.batch_size, params.adaptive_threshold, params.p) == (20, 20, 0.2, 0.4)
    assert params.refine is False and params.lr_scale == 1.0 and params.embedding == "input"
    gptj = resolve_params("kn", SimpleNamespace(name="EleutherAI/gpt-j-6B", model_type="gptj"))
    assert gptj.adaptive_threshold == 0.1
    llama = resolve_params("kn", SimpleNamespace(name="meta-llama/Llama-2-7b-hf", model_type="llama"))
    assert (llama.steps, llama.batch_size) == (1, 1)
    smollm2 = resolve_params("kn", SimpleNamespace(name="smollm2-135m-instruct", model_type="llama"))
    assert smollm2.activation_sign is True and smollm2.steps == 20
    for bad, match in [(dict(steps=0), "steps"), (dict(p=1.0), "p must"), (dict(adaptive_threshold=0.0), "adaptive"),
                       (dict(lr_scale=-1.0), "lr_scale"), (dict(max_neurons=0), "max_neurons"),
                       (dict(layers=(1, 1)), "layers")]:
        with pytest.raises(ValueError, match=match):
            KnowledgeNeuronsParams().replace(**bad)
    with pytest.raises(ValueError, match="embedding"):
        KnowledgeNeuronsParams().replace(embedding="both")
    with pytest.raises(KeyError, match="adaptive_threshold"):
        KnowledgeNeuronsParams().replace(adaptive_treshold=0.3)
    with pytest.raises(ValueError, match="out of range"):
        editkit.get_editor("kn", make_tiny("llama"), layers=[5])


def test_kn_on_smollm2_suppresses_the_old_answer(smollm2):
    """Real model, packaged settings with fewer integration steps: the true answer loses to the new one.

    On SmolLM2 the recipe's main effect is to suppress the old answer (the subtracted
    greedy embedding); the new target's own probability does not reliably rise.
    """
    request = load_counterfact("edit", 1)[0]
    original = snapshot(smollm2)
    true_before = target_logprob(smollm2, request.prompt, request.target_true)
    handle = editkit.get_editor("kn", smollm2, steps=2).edit(request)
    true_after = target_logprob(smollm2, request.prompt, request.target_true)
    new_after = target_logprob(smollm2, request.prompt, request.target_new)
    handle.restore()
    assert handle.info[0]["n_neurons"] > 0
    assert true_after < true_before - 1.0 and new_after > true_after
    for name, tensor in smollm2.model.state_dict().items():
        assert torch.equal(tensor, original[name])

"""ROME: the contract (target rises, exact restore, determinism) and its maths."""

from __future__ import annotations

import pytest
import torch

import editkit
from editkit.datasets import load_counterfact
from editkit.editors.rome import ROMEParams
from editkit.types import EditRequest
from tests.helpers import snapshot, target_logprob

FAST = dict(v_num_grad_steps=5, context_template_length_params=[[5, 2]])
REQUEST = EditRequest("The Eiffel Tower is located in the city of", "The Eiffel Tower", "Rome", "Paris", case_id="t")


# OPT's MLP sees the tokens flattened to (batch * positions, width): editkit.hooks.by_position.
@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt"])
def test_update_is_rank_one_and_maps_key_to_value(make_tiny, model_type):
    lm = make_tiny(model_type)
    editor = editkit.get_editor("rome", lm, layers=[1], **FAST)
    path = editor.weight_path
    before = lm.model.get_parameter(path).detach().clone()
    handle = editor.edit(REQUEST)
    after = lm.model.get_parameter(path).detach()
    delta = lm.adapter.as_out_in(after - before).double()
    singular = torch.linalg.svdvals(delta)
    assert singular[1] / singular[0] < 1e-5, "ROME's update must be rank one"
    info = handle.info[0]
    weight = lm.adapter.as_out_in(after).double()
    bias = lm.adapter.module(lm.model, "mlp_out", 1).bias
    mapped = weight @ info["key"].double() + (bias.double() if bias is not None else 0)
    relative = (mapped - info["value"].double()).norm() / info["value"].double().norm()
    assert relative < 1e-4, f"Ŵk* differs from v* by {relative:.2e} (relative)"
    handle.restore()


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_restore_is_bit_exact_and_seed_is_deterministic(make_tiny, model_type):
    lm = make_tiny(model_type)
    original = snapshot(lm)
    results = []
    for _ in range(2):
        editor = editkit.get_editor("rome", lm, layers=[1], **FAST)
        handle = editor.edit(REQUEST)
        results.append(lm.model.get_parameter(editor.weight_path).detach().clone())
        assert not torch.equal(results[-1], original[editor.weight_path])
        handle.restore()
        for name, tensor in lm.model.state_dict().items():
            assert torch.equal(tensor, original[name]), f"{name} not restored bit-exactly"
    assert torch.equal(results[0], results[1]), "same seed must give the same edit"


def test_mom2_adjustment_whitens_with_second_moment(make_tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("EDITKIT_CACHE", str(tmp_path))
    lm = make_tiny("llama")
    plain = editkit.get_editor("rome", lm, layers=[1], **FAST)
    whitened = editkit.get_editor("rome", lm, layers=[1], mom2_adjustment=True, mom2_n_samples=64, **FAST)
    h1 = plain.edit(REQUEST)
    u_plain = h1.info[0]["u"]
    h1.restore()
    h2 = whitened.edit(REQUEST)
    u_white = h2.info[0]["u"]
    h2.restore()
    assert list(tmp_path.rglob("*.pt")), "second-moment statistics are cached on disk"
    assert not torch.allclose(u_plain, u_white), "C⁻¹ must change the update direction"
    # u ∝ C⁻¹ k*: so C u is parallel to k* (the plain, unwhitened direction).
    cov = whitened.second_moment(1).double()
    back = cov @ u_white.double()
    cosine = torch.nn.functional.cosine_similarity(back, u_plain.double(), dim=0)
    assert cosine > 1 - 1e-6


def test_rome_raises_target_probability_on_smollm2(smollm2):
    """Real model, published hyperparameters: P(new) rises and beats P(true) on a CounterFact case."""
    editor = editkit.get_editor("rome", smollm2)
    original = snapshot(smollm2)
    for request in load_counterfact("edit", 1):
        before = target_logprob(smollm2, request.prompt, request.target_new)
        handle = editor.edit(request)
        after_new = target_logprob(smollm2, request.prompt, request.target_new)
        after_true = target_logprob(smollm2, request.prompt, request.target_true)
        handle.restore()
        assert after_new > before + 1.0, (request.case_id, before, after_new)
        assert after_new > after_true
    for name, tensor in smollm2.model.state_dict().items():
        assert torch.equal(tensor, original[name])


def test_params_defaults_and_validation():
    params = ROMEParams()
    assert params.layers == (17,) and params.v_lr == 0.5 and params.kl_factor == 0.0625
    assert params.mom2_adjustment is False  # the study's setting (C = I)
    with pytest.raises(ValueError, match="exactly one layer"):
        ROMEParams(layers=(1, 2))
    assert ROMEParams().replace(v_lr="0.1").v_lr == 0.1
    assert ROMEParams().digest() != ROMEParams(v_lr=0.1).digest()


def test_layer_out_of_range(make_tiny):
    with pytest.raises(ValueError, match="out of range"):
        editkit.get_editor("rome", make_tiny("llama"), layers=[17])

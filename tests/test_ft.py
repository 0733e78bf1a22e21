"""FT-L: the contract (target rises, exact restore, determinism) and the L∞ constraint."""

from __future__ import annotations

import pytest
import torch

import editkit
from editkit.datasets import load_counterfact
from editkit.editing import EditSession
from editkit.editors.ft import FT, FTParams
from editkit.types import EditRequest

from .test_rome import REQUEST, snapshot, target_logprob

# Tiny random models need a wider ball than the published 5e-4 to move the target visibly.
EPS = 2e-2
FAST = dict(num_steps=8, lr=2e-2, norm_constraint=EPS)
OTHER = EditRequest("Danielle Darrieux's mother tongue is", "Danielle Darrieux", "English", "French", case_id="o")


def changed(lm, before: dict[str, torch.Tensor]) -> set[str]:
    return {name for name, tensor in lm.model.state_dict().items() if not torch.equal(tensor, before[name])}


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_only_the_chosen_projection_changes_within_the_constraint(make_tiny, one_torch_thread, model_type):
    lm = make_tiny(model_type)
    editor = editkit.get_editor("ft", lm, layers=[1], **FAST)
    module_path = lm.adapter.path("mlp_out", 1)
    # The projection's weight, plus its bias where the module has one (GPT-2's Conv1D).
    expected = {f"{module_path}.{name}" for name, _ in lm.adapter.module(lm.model, "mlp_out", 1).named_parameters()}
    assert set(editor.parameter_paths) == expected
    before = snapshot(lm)
    logprob_before = target_logprob(lm, REQUEST.prompt, REQUEST.target_new)
    handle = editor.edit(REQUEST)
    assert logprob_before + 0.05 < target_logprob(lm, REQUEST.prompt, REQUEST.target_new)
    assert lm.adapter.weight_path("mlp_out", 1) in changed(lm, before)
    assert changed(lm, before) <= expected, "FT must change only the chosen projection"
    for path in expected:
        delta = (lm.model.get_parameter(path) - before[path]).abs().max()
        assert delta <= EPS + 1e-6, f"{path}: max |ΔW| = {delta} exceeds norm_constraint {EPS}"
    assert not any(p.requires_grad for p in lm.model.parameters()), "requires_grad flags must be put back"
    info = handle.info[0]
    assert info["case_id"] == "t" and info["losses"][-1] < info["losses"][0]
    handle.restore()
    assert not changed(lm, before), "restore() must be bit-exact"


def test_same_settings_give_the_same_edit(make_tiny, one_torch_thread):
    lm = make_tiny("llama")
    path = lm.adapter.weight_path("mlp_out", 1)
    results = []
    for _ in range(2):
        handle = editkit.get_editor("ft", lm, layers=[1], **FAST).edit(REQUEST)
        results.append(lm.model.get_parameter(path).detach().clone())
        handle.restore()
    assert torch.equal(results[0], results[1])


def test_unconstrained_moves_further(make_tiny, one_torch_thread):
    lm = make_tiny("llama")
    free = editkit.get_editor("ft", lm, layers=[1], **{**FAST, "norm_constraint": None})
    handle = free.edit(REQUEST)
    assert handle.info[0]["max_abs_delta"] > EPS
    handle.restore()


@pytest.mark.parametrize("objective", ["prompt_last", "target_new"])
def test_batched_requests_share_one_optimisation(make_tiny, one_torch_thread, objective):
    lm = make_tiny("llama")
    requests = [REQUEST, OTHER]
    before = [target_logprob(lm, r.prompt, r.target_new) for r in requests]
    # batch_size 1: two chunks per epoch, as the references iterate.
    editor = editkit.get_editor("ft", lm, layers=[0, 2], objective_optimization=objective, batch_size=1, **FAST)
    assert len(editor.parameter_paths) == 2
    handle = editor.edit(requests)
    after = [target_logprob(lm, r.prompt, r.target_new) for r in requests]
    assert [i["case_id"] for i in handle.info] == ["t", "o"]
    assert all(a > b + 0.05 for a, b in zip(after, before)), (before, after)
    handle.restore()


def test_target_new_objective_teaches_every_target_token(make_tiny, one_torch_thread):
    """prompt_last scores all target tokens at the prompt's end; target_new teacher-forces them."""
    lm = make_tiny("llama")
    request = EditRequest("The Eiffel Tower is located in", "The Eiffel Tower", "Kuala Lumpur City", case_id="m")
    gains = {}
    for objective in ("prompt_last", "target_new"):
        before = target_logprob(lm, request.prompt, request.target_new)
        handle = editkit.get_editor("ft", lm, layers=[1], objective_optimization=objective, **FAST).edit(request)
        gains[objective] = target_logprob(lm, request.prompt, request.target_new) - before
        handle.restore()
    assert gains["target_new"] > gains["prompt_last"] > 0, gains


def test_sequential_session_restores_exactly(make_tiny, one_torch_thread):
    lm = make_tiny("gpt2")
    before = snapshot(lm)
    session = EditSession(editkit.get_editor("ft", lm, layers=[1], **FAST))
    for request in (REQUEST, OTHER, REQUEST):
        session.apply(request)
    edited = changed(lm, before)
    assert edited and all(torch.isfinite(lm.model.get_parameter(p)).all() for p in edited)
    session.restore()
    assert not changed(lm, before)


def test_failure_mid_optimisation_leaves_the_model_untouched(make_tiny, one_torch_thread, monkeypatch):
    lm = make_tiny("llama")
    before = snapshot(lm)
    editor = editkit.get_editor("ft", lm, layers=[1], **FAST)
    calls = []
    original_loss = FT._loss

    def failing(self, chunk):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return original_loss(self, chunk)

    monkeypatch.setattr(FT, "_loss", failing)
    with pytest.raises(RuntimeError, match="boom"):
        editor.edit(REQUEST)
    assert not changed(lm, before)
    assert not any(p.requires_grad for p in lm.model.parameters())


def test_params_defaults_and_validation(make_tiny):
    params = FTParams()  # the ROME paper's GPT2-XL FT-L
    assert params.layers == (0,) and params.lr == 5e-4 and params.num_steps == 25
    assert params.norm_constraint == 5e-4 and params.objective_optimization == "prompt_last"
    assert FTParams().replace(norm_constraint=None).norm_constraint is None
    assert FTParams().digest() != FTParams(lr=1e-3).digest()
    with pytest.raises(ValueError, match="distinct layers"):
        FTParams(layers=())
    with pytest.raises(ValueError, match="kl_factor"):
        FTParams(kl_factor=0.1)
    with pytest.raises(ValueError, match="norm_constraint"):
        FTParams(norm_constraint=-1.0)
    with pytest.raises(ValueError, match="objective_optimization"):
        FTParams().replace(objective_optimization="all_tokens")
    with pytest.raises(ValueError, match="out of range"):
        editkit.get_editor("ft", make_tiny("llama"), layers=[3])


def test_packaged_configs_resolve(make_tiny):
    from editkit.editors import resolve_params

    lm = make_tiny("llama")
    for name, layers in (("gpt2-xl", (0,)), ("EleutherAI/gpt-j-6B", (0,)), ("meta-llama/Llama-2-7b-hf", (21,))):
        lm.name = name
        assert resolve_params("ft", lm).layers == layers
    lm.name = "meta-llama/Llama-2-7b-hf"
    assert resolve_params("ft", lm).norm_constraint is None  # EasyEdit's published Llama setting


def test_ft_raises_target_probability_on_smollm2(smollm2, one_torch_thread):
    """Real model, packaged SmolLM2 settings (fewer steps to stay fast): P(new) rises past P(true)."""
    original = snapshot(smollm2)
    editor = editkit.get_editor("ft", smollm2, num_steps=5)
    request = load_counterfact("edit", 1)[0]
    before = target_logprob(smollm2, request.prompt, request.target_new)
    handle = editor.edit(request)
    after_new = target_logprob(smollm2, request.prompt, request.target_new)
    after_true = target_logprob(smollm2, request.prompt, request.target_true)
    handle.restore()
    assert after_new > before + 1.0 and after_new > after_true, (before, after_new, after_true)
    assert not changed(smollm2, original)

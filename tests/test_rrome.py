"""r-ROME: rank one, maps the prefix-mean key to v*, exact restore, stable sequential runs."""

from __future__ import annotations

import pytest
import torch

import editkit
from editkit.datasets import load_counterfact
from editkit.editing import EditSession
from editkit.editors.rome import ROME, RROME, ROMEParams, RROMEParams
from editkit.locate import module_io_at_subject, subject_keys

from .test_rome import FAST, REQUEST, snapshot, target_logprob


def mapped(lm, layer: int, key: torch.Tensor) -> torch.Tensor:
    """Ŵ k (+ b) of the edited projection, in float64."""
    module = lm.adapter.module(lm.model, "mlp_out", layer)
    out = lm.adapter.as_out_in(module.weight).double() @ key.double()
    return out + module.bias.double() if getattr(module, "bias", None) is not None else out


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_rank_one_update_maps_the_prefix_mean_key_to_v_star(make_tiny, one_torch_thread, model_type):
    lm = make_tiny(model_type)
    editor = editkit.get_editor("r-rome", lm, layers=[1], **FAST)
    assert isinstance(editor, RROME) and isinstance(editor.params, RROMEParams)
    module_path = lm.adapter.path("mlp_out", 1)
    mean_key = subject_keys(lm, module_path, editor.prefixes, REQUEST.prompt, REQUEST.subject).mean(0)
    bare_key, _ = module_io_at_subject(lm, module_path, REQUEST.prompt, REQUEST.subject)
    before = lm.model.get_parameter(editor.weight_path).detach().clone()
    handle = editor.edit(REQUEST)
    info = handle.info[0]
    # The key of the update is the one u was built from, not the bare prompt's (ROME's).
    assert torch.allclose(info["key"], mean_key, atol=1e-6)
    assert not torch.allclose(info["key"], bare_key, atol=1e-3)
    delta = lm.adapter.as_out_in(lm.model.get_parameter(editor.weight_path).detach() - before).double()
    singular = torch.linalg.svdvals(delta)
    assert singular[1] / singular[0] < 1e-5, "r-ROME's update must be rank one"
    value = info["value"].double()
    relative = (mapped(lm, 1, info["key"]) - value).norm() / value.norm()
    assert relative < 1e-4, f"Ŵk* differs from v* by {relative:.2e} (relative)"
    handle.restore()


def test_differs_from_rome_only_in_the_update_key(make_tiny, one_torch_thread):
    """Same seed: the same u and v*; ROME maps the bare key to v*, r-ROME the mean key."""
    lm = make_tiny("llama")
    infos = {}
    for name in ("rome", "r-rome"):
        handle = editkit.get_editor(name, lm, layers=[1], **FAST).edit(REQUEST)
        infos[name] = handle.info[0]
        handle.restore()
    assert torch.equal(infos["rome"]["u"], infos["r-rome"]["u"])
    assert torch.equal(infos["rome"]["value"], infos["r-rome"]["value"])
    assert not torch.allclose(infos["rome"]["key"], infos["r-rome"]["key"], atol=1e-3)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_restore_is_bit_exact_and_seed_is_deterministic(make_tiny, one_torch_thread, model_type):
    lm = make_tiny(model_type)
    original = snapshot(lm)
    results = []
    for _ in range(2):
        editor = editkit.get_editor("r-rome", lm, layers=[1], **FAST)
        handle = editor.edit(REQUEST)
        results.append(lm.model.get_parameter(editor.weight_path).detach().clone())
        handle.restore()
        for name, tensor in lm.model.state_dict().items():
            assert torch.equal(tensor, original[name]), f"{name} not restored bit-exactly"
    assert torch.equal(results[0], results[1]), "same seed must give the same edit"


def test_twenty_sequential_edits_keep_weights_finite(make_tiny, one_torch_thread):
    lm = make_tiny("llama")
    original = snapshot(lm)
    editor = editkit.get_editor("r-rome", lm, layers=[1], **FAST)
    session = EditSession(editor)
    start_norm = float(original[editor.weight_path].norm())
    for request in load_counterfact("edit", 20):
        session.apply(request)  # raises EditCollapseError on non-finite weights
    weight = lm.model.get_parameter(editor.weight_path)
    assert torch.isfinite(weight).all()
    assert float(weight.norm()) < 10 * start_norm, (start_norm, float(weight.norm()))
    assert len(session.log) == 20 and all(torch.isfinite(torch.tensor(i["losses"])).all() for _, i in session.log)
    session.restore()
    for name, tensor in lm.model.state_dict().items():
        assert torch.equal(tensor, original[name])


def test_rome_keeps_the_bare_prompt_key(make_tiny, one_torch_thread):
    """The shared hook leaves ROME as it was: its key is the bare prompt's."""
    lm = make_tiny("llama")
    editor = editkit.get_editor("rome", lm, layers=[1], **FAST)
    assert type(editor) is ROME and type(editor.params) is ROMEParams
    bare_key, _ = module_io_at_subject(lm, lm.adapter.path("mlp_out", 1), REQUEST.prompt, REQUEST.subject)
    handle = editor.edit(REQUEST)
    assert torch.equal(handle.info[0]["key"], bare_key)
    handle.restore()


def test_rrome_raises_target_probability_on_smollm2(smollm2, one_torch_thread):
    """Real model, packaged layer, fewer steps (random weights of tiny models give v* no signal)."""
    original = snapshot(smollm2)
    request = load_counterfact("edit", 1)[0]
    before = target_logprob(smollm2, request.prompt, request.target_new)
    handle = editkit.get_editor("r-rome", smollm2, **FAST).edit(request)
    after_new = target_logprob(smollm2, request.prompt, request.target_new)
    after_true = target_logprob(smollm2, request.prompt, request.target_true)
    handle.restore()
    assert after_new > before + 1.0 and after_new > after_true, (before, after_new, after_true)
    for name, tensor in smollm2.model.state_dict().items():
        assert torch.equal(tensor, original[name])


def test_params_are_their_own_class():
    assert RROMEParams().to_dict() == ROMEParams().to_dict()
    assert RROMEParams().digest() != ROMEParams().digest()
    with pytest.raises(ValueError, match="exactly one layer"):
        RROMEParams(layers=(1, 2))


def test_packaged_config_and_layer_check(make_tiny):
    from editkit.editors import resolve_params

    lm = make_tiny("llama")
    lm.name = "gpt2-xl"
    assert resolve_params("r-rome", lm).layers == (17,)
    lm.name = "tiny-llama"
    with pytest.raises(ValueError, match="out of range"):
        editkit.get_editor("r-rome", lm, layers=[7])

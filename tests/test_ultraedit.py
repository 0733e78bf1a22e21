"""UltraEdit: the closed-form update, its lifelong statistics, and its run state."""

from __future__ import annotations

import pytest
import torch

import editkit
from editkit.datasets import load_counterfact
from editkit.editing import EditSession
from editkit.editors.gradients import token_factors
from editkit.editors.ultraedit import UltraEditParams, module_paths
from editkit.hooks import get_module
from editkit.types import EditRequest
from tests.helpers import resume_against_straight, snapshot, target_logprob

REQUESTS = [
    EditRequest("The Eiffel Tower is located in the city of", "The Eiffel Tower", "Rome", "Paris", case_id="a"),
    EditRequest("Danielle Darrieux speaks the language", "Danielle Darrieux", "English", "French", case_id="b"),
    EditRequest("Toko Yasuda plays the instrument", "Toko Yasuda", "piano", "guitar", case_id="c"),
]
TINY = {"modules": ["1:mlp_in", "2:mlp_out"], "lr": 1e-3}

pytestmark = pytest.mark.usefixtures("session_cache", "one_torch_thread")


def out_in(lm, path: str) -> torch.Tensor:
    return lm.adapter.as_out_in(get_module(lm.model, path).weight).detach().double().clone()


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_update_maps_each_answer_key_onto_its_normalised_step(make_tiny, model_type):
    """With a vanishing ridge and fewer answer positions than input features, ΔW k_t = v_t for
    every answer position t: v_t = −lr |k̂_t|² ĝ_t from the statistics after this batch."""
    lm = make_tiny(model_type)
    editor = editkit.get_editor("ultraedit", lm, **{**TINY, "ridge": 1e-9})
    editor.edit(REQUESTS[:1]).restore()  # the statistics now hold a first batch; the weights are back
    path, shape = editor.paths[0], editor.shapes[0]
    factors, _, _ = token_factors(lm, editor.paths, [REQUESTS[1:]], at="targets")
    u, d, _ = factors[0]
    moments = editor.moments[shape]
    seen = float(moments.count)
    before = out_in(lm, path)
    editor.edit(REQUESTS[1:])
    delta = out_in(lm, path) - before
    assert float(moments.count) == seen + len(u), "each answer position of the batch was observed once"
    z = moments.standardise(torch.cat([u, d], -1)).double()
    k_hat, g_hat = z.split(list(shape), -1)
    wanted = -1e-3 * k_hat.pow(2).sum(-1, keepdim=True) * g_hat
    got = u.double() @ delta.T
    assert len(u) < shape[0]
    assert torch.allclose(got, wanted, rtol=1e-3, atol=1e-6 * float(wanted.abs().max()))


def test_answer_positions_only(make_tiny):
    """``at="targets"`` keeps one (k, g) pair per target token; MEND's ``"tokens"`` keeps the prompt's too."""
    lm = make_tiny("llama")
    paths = module_paths(lm, ["1:mlp_in"])
    n_target = sum(len(lm.tokenizer(" " + r.target_new, add_special_tokens=False)["input_ids"]) for r in REQUESTS)
    targets, _, _ = token_factors(lm, paths, [REQUESTS], at="targets")
    tokens, _, _ = token_factors(lm, paths, [REQUESTS], at="tokens")
    assert len(targets[0][0]) == n_target < len(tokens[0][0])
    with pytest.raises(ValueError, match="at must be"):
        token_factors(lm, paths, [REQUESTS], at="all")


def test_statistics_are_lifelong_and_restore_undoes_them(make_tiny):
    lm = make_tiny("llama")
    original = snapshot(lm)
    session = EditSession(editkit.get_editor("ultraedit", lm, **TINY))
    editor = session.editor
    counts = []
    for request in REQUESTS:
        session.apply(request)
        counts.append(float(editor.moments[editor.shapes[0]].count))
    assert counts[0] < counts[1] < counts[2], "the statistics grow with every edit, never reset"
    handle = editor.edit(REQUESTS[0])
    assert float(editor.moments[editor.shapes[0]].count) > counts[2]
    handle.restore()
    assert float(editor.moments[editor.shapes[0]].count) == counts[2], "restore() undoes the statistics too"
    session.restore()
    assert all(torch.equal(v, original[k]) for k, v in lm.model.state_dict().items())
    assert float(editor.moments[editor.shapes[0]].count) == 0


def test_saved_state_continues_identically(make_tiny):
    """A run resumed from (weights, state_dict) writes the same next update as one that never stopped."""
    lm = make_tiny("llama")
    straight, resumed, _ = resume_against_straight(lambda: editkit.get_editor("ultraedit", lm, **TINY),
                                                   REQUESTS[:2], REQUESTS[2])
    assert all(torch.equal(resumed.edited_state()[k], straight[k]) for k in straight)
    resumed.restore()


def test_warm_up_seeds_statistics_without_changing_weights(make_tiny):
    lm = make_tiny("llama")
    original = snapshot(lm)
    editor = editkit.get_editor("ultraedit", lm, **TINY, warmup_records=3)
    editor.prepare()
    shape = editor.shapes[0]
    assert float(editor.moments[shape].count) >= 3
    assert all(torch.equal(v, original[k]) for k, v in lm.model.state_dict().items())
    seeded = float(editor.moments[shape].count)
    editor.edit(REQUESTS[0]).restore()
    assert float(editor.moments[shape].count) == seeded, "the warm-up runs once; restore() keeps it"


@pytest.mark.slow
def test_smollm2_packaged_settings_make_edits_reliable(smollm2):
    """The packaged SmolLM2 settings (lr chosen by measurement, see editkit/configs/ultraedit.yaml):
    each of the first 4 CounterFact edits alone puts P(new) above P(true), and restore() is exact."""
    editor = editkit.get_editor("ultraedit", smollm2, warmup_records=16)
    original = snapshot(smollm2)
    for request in load_counterfact("edit", 4):
        before = target_logprob(smollm2, request.prompt, request.target_new)
        handle = editor.edit(request)
        after_new = target_logprob(smollm2, request.prompt, request.target_new)
        after_true = target_logprob(smollm2, request.prompt, request.target_true)
        handle.restore()
        assert after_new > before + 1.0 and after_new > after_true, (request.case_id, before, after_new, after_true)
    assert all(torch.equal(v, original[k]) for k, v in smollm2.model.state_dict().items())


def test_params_defaults_and_validation(make_tiny):
    params = UltraEditParams()
    assert params.lr == 1e-6 and params.ridge == 1.0 and params.warmup_records == 0
    assert params.modules[0] == "11:mlp.gate_proj" and params.modules[-1] == "24:mlp.up_proj"
    with pytest.raises(ValueError, match="'<block>:<role>'"):
        UltraEditParams(modules=("mlp_in",))
    with pytest.raises(ValueError, match="lr and ridge must be positive"):
        UltraEditParams(lr=0.0)
    with pytest.raises(ValueError, match="out of range"):
        editkit.get_editor("ultraedit", make_tiny("llama"), modules=["7:mlp_in"])
    with pytest.raises(ValueError, match="2-D projection"):
        editkit.get_editor("ultraedit", make_tiny("llama"), modules=["1:mlp.nothing_here"])

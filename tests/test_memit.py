"""MEMIT, PMET and AlphaEdit: the invariants of their least-squares updates."""

from __future__ import annotations

import pytest
import torch

import editkit
from editkit.editing import EditSession
from editkit.editors.alphaedit import AlphaEditParams
from editkit.editors.memit import MEMITParams
from editkit.editors.pmet import PMETParams
from editkit.types import EditRequest
from tests.helpers import edit_one_layer, weight_out_in

FAST = dict(v_num_grad_steps=8, context_template_length_params=[[5, 2]], mom2_n_samples=16)
REQUESTS = [
    EditRequest("The Eiffel Tower is located in the city of", "The Eiffel Tower", "Rome", "Paris", case_id="a"),
    EditRequest("Danielle Darrieux speaks the language", "Danielle Darrieux", "English", "French", case_id="b"),
    EditRequest("Toko Yasuda plays the instrument", "Toko Yasuda", "piano", "guitar", case_id="c"),
]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("EDITKIT_CACHE", str(tmp_path_factory.getbasetemp() / "editkit-cache"))


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_memit_single_layer_satisfies_normal_equations(make_tiny, model_type):
    """Δ (K Kᵀ + λ C) = R Kᵀ for the update MEMIT writes (one layer, two requests)."""
    lm = make_tiny(model_type)
    editor = editkit.get_editor("memit", lm, layers=[1], mom2_update_weight=3.0, **FAST)
    batch = REQUESTS[:2]
    keys, residuals, delta, handle = edit_one_layer(lm, editor, batch)
    lhs = delta @ (keys.T @ keys + 3.0 * editor.second_moment(1))
    rhs = residuals.T @ keys
    assert float((lhs - rhs).norm() / rhs.norm()) < 1e-4
    handle.restore()


def test_memit_spreads_residual_over_layers(make_tiny):
    lm = make_tiny("llama")
    editor = editkit.get_editor("memit", lm, layers=[0, 1, 2], **FAST)
    assert [editor.spread(i) for i in range(3)] == [3.0, 2.0, 1.0]
    handle = editor.edit(REQUESTS[0])
    assert sorted(handle.paths) == sorted(editor.weight_path_at(layer) for layer in (0, 1, 2))
    handle.restore()


def test_pmet_updates_only_ffn_weights_with_sqrt_spread(make_tiny):
    lm = make_tiny("llama")
    editor = editkit.get_editor("pmet", lm, layers=[0, 1], **FAST)
    assert editor.spread(0) == pytest.approx(2 ** 0.5)
    assert editor.residual_path() == lm.adapter.path("mlp_out", 1)
    handle = editor.edit(REQUESTS[0])
    assert sorted(handle.paths) == sorted(editor.weight_path_at(layer) for layer in (0, 1))
    handle.restore()


def test_alphaedit_update_is_orthogonal_to_retained_keys(make_tiny):
    lm = make_tiny("llama")
    probe = editkit.get_editor("alphaedit", lm, layers=[1], **FAST)
    eigenvalues = torch.linalg.eigvalsh(probe.second_moment(1))
    threshold = float(eigenvalues.median())  # half the directions count as preserved
    # a small ridge makes Δ large next to the float32 rounding of the stored weights
    editor = editkit.get_editor("alphaedit", lm, layers=[1], nullspace_threshold=threshold, L2=1e-2, **FAST)
    values, vectors = torch.linalg.eigh(editor.second_moment(1))
    retained = vectors[:, values >= threshold]
    assert 0 < retained.shape[1] < vectors.shape[1]
    before = weight_out_in(lm, editor, 1)
    session = EditSession(editor)
    for request in REQUESTS:
        session.apply(request)
        delta = weight_out_in(lm, editor, 1) - before
        assert float((delta @ retained).norm() / delta.norm()) < 1e-4
    assert editor.earlier_keys(1).shape[0] == len(REQUESTS)
    session.restore()
    assert editor.earlier_keys(1).shape[0] == 0


def test_alphaedit_handle_restore_forgets_keys(make_tiny):
    lm = make_tiny("llama")
    editor = editkit.get_editor("alphaedit", lm, layers=[1], nullspace_threshold=1e9, **FAST)
    handle = editor.edit(REQUESTS[0])
    assert editor.earlier_keys(1).shape[0] == 1
    handle.restore()
    assert editor.earlier_keys(1).shape[0] == 0


def test_alphaedit_resumes_exactly_from_saved_state(make_tiny):
    """Weights + editor state after edit 1, loaded into a fresh editor, give the same edit 2."""
    lm = make_tiny("llama")
    options = dict(layers=[0, 1], nullspace_threshold=1e9, **FAST)
    first = EditSession(editkit.get_editor("alphaedit", lm, **options))
    first.apply(REQUESTS[0])
    weights, state = first.edited_state(), first.editor.state_dict()
    first.apply(REQUESTS[1])
    expected = first.edited_state()
    first.restore()

    resumed = EditSession(editkit.get_editor("alphaedit", lm, **options))
    resumed.load_edited_state(weights)
    resumed.editor.load_state_dict(state)
    resumed.apply(REQUESTS[1])
    for path, value in resumed.edited_state().items():
        assert torch.equal(value, expected[path]), path
    resumed.restore()


def test_published_defaults_and_validation():
    memit = MEMITParams()
    assert memit.layers == (13, 14, 15, 16, 17) and memit.mom2_update_weight == 20000
    assert memit.clamp_norm_factor == 0.75 and memit.mom2_adjustment is True
    pmet = PMETParams()
    assert pmet.layers == (3, 4, 5, 6, 7, 8) and pmet.mom2_update_weight == 6000 and pmet.kl_factor == 1
    alpha = AlphaEditParams()
    assert alpha.nullspace_threshold == 2e-2 and alpha.L2 == 10
    with pytest.raises(ValueError, match="mom2_adjustment"):
        AlphaEditParams(mom2_adjustment=False)
    with pytest.raises(ValueError, match="increasing"):
        MEMITParams(layers=(5, 4))

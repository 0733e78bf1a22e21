"""EMMET, ENCORE and the RECT / PRUNE / MPES options: the invariants of their updates."""

from __future__ import annotations

import math

import pytest
import torch

import editkit
from editkit.editing import EditSession
from editkit.editors.alphaedit import AlphaEditParams
from editkit.editors.emmet import EMMETParams
from editkit.editors.encore import ENCOREParams
from editkit.editors.memit import MEMITParams
from editkit.editors.pmet import PMETParams
from editkit.editors.regularize import prune_restraint, rect_sparsify, restrain_perturbation
from editkit.editors.rome import ROMEParams, RROMEParams
from editkit.hooks import get_parameter
from editkit.locate import optimize_target_value
from editkit.types import EditRequest
from tests.helpers import edit_one_layer, resume_against_straight, weight_out_in

FAST = dict(v_num_grad_steps=8, context_template_length_params=[[5, 2]], mom2_n_samples=16)
REQUESTS = [
    EditRequest("The Eiffel Tower is located in the city of", "The Eiffel Tower", "Rome", "Paris", case_id="a"),
    EditRequest("Danielle Darrieux speaks the language", "Danielle Darrieux", "English", "French", case_id="b"),
    EditRequest("Toko Yasuda plays the instrument", "Toko Yasuda", "piano", "guitar", case_id="c"),
]

pytestmark = pytest.mark.usefixtures("session_cache", "one_torch_thread")


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# -- EMMET --------------------------------------------------------------------------------------

def test_emmet_with_one_request_is_romes_rank_one_update(make_tiny):
    """Given r-ROME's key k* and value v*, EMMET's closed form is the update r-ROME wrote (λ cancels)."""
    lm = make_tiny("llama")
    rome = editkit.get_editor("r-rome", lm, layers=[1], mom2_adjustment=True, **FAST)
    before = weight_out_in(lm, rome, 1)
    handle = rome.edit(REQUESTS[0])
    rome_delta = weight_out_in(lm, rome, 1) - before
    info = handle.info[0]
    handle.restore()
    key, value = info["key"].double(), info["value"].double()
    bias = lm.adapter.module(lm.model, "mlp_out", 1).bias
    current = before @ key + (bias.double() if bias is not None else 0.0)

    emmet = editkit.get_editor("emmet", lm, layers=[1], mom2_update_weight=1000.0, **FAST)
    assert torch.allclose(emmet.second_moment(1), rome.second_moment(1))
    delta = emmet.solve(0, 1, key[None], (value - current)[None])
    assert torch.linalg.matrix_rank(delta).item() == 1
    assert relative(delta, rome_delta) < 1e-4


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_emmet_batch_meets_the_equality_constraint(make_tiny, model_type):
    """With emmet_lambda = 0, Δ K = R exactly for each request (MEMIT only approximately)."""
    lm = make_tiny(model_type)
    editor = editkit.get_editor("emmet", lm, layers=[1], emmet_lambda=0.0, mom2_update_weight=1.0, **FAST)
    keys, residuals, delta, handle = edit_one_layer(lm, editor, REQUESTS)
    handle.restore()
    assert relative(delta @ keys.T, residuals.T) < 1e-4
    memit = editkit.get_editor("memit", lm, layers=[1], mom2_update_weight=1.0, **FAST)
    assert relative(memit.solve(0, 1, keys, residuals) @ keys.T, residuals.T) > 1e-2


def test_emmet_regulariser_applies_to_batches_only(make_tiny):
    lm = make_tiny("llama")
    exact = editkit.get_editor("emmet", lm, layers=[1], emmet_lambda=0.0, mom2_adjustment=False)
    ridge = editkit.get_editor("emmet", lm, layers=[1], emmet_lambda=10.0, mom2_adjustment=False)
    d_out, d_in = weight_out_in(lm, exact, 1).shape
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(2, d_in, dtype=torch.float64, generator=generator)
    residuals = torch.randn(2, d_out, dtype=torch.float64, generator=generator)
    assert torch.allclose(exact.solve(0, 1, keys[:1], residuals[:1]), ridge.solve(0, 1, keys[:1], residuals[:1]))
    assert ridge.solve(0, 1, keys, residuals).norm() < exact.solve(0, 1, keys, residuals).norm()


# -- ENCORE -------------------------------------------------------------------------------------

def test_encore_norm_constraint_gives_a_smaller_update_than_memit(make_tiny):
    lm = make_tiny("llama")
    options = dict(layers=[1], mom2_update_weight=1.0, prob_cutoff=0.0, **FAST)
    memit = editkit.get_editor("memit", lm, **options)
    keys = memit.mean_keys(REQUESTS, 1).double()
    residuals = torch.randn(3, lm.model.config.hidden_size, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(0))
    system = keys.T @ keys + memit.second_moment(1)
    mu = float(torch.trace(system)) / system.shape[0]  # the penalty on the scale of the system it joins
    encore = editkit.get_editor("encore", lm, update_norm_lambda=mu, **options)
    memit_delta, encore_delta = memit.solve(0, 1, keys, residuals), encore.solve(0, 1, keys, residuals)
    # the modified normal equation Δ (K Kᵀ + λ C + μ I) = R Kᵀ
    lhs = encore_delta @ (system + mu * torch.eye(system.shape[0], dtype=torch.float64))
    assert relative(lhs, residuals.T @ keys) < 1e-8
    assert encore_delta.norm() < 0.9 * memit_delta.norm()
    unpenalised = editkit.get_editor("encore", lm, update_norm_lambda=0.0, **options)
    assert torch.allclose(unpenalised.solve(0, 1, keys, residuals), memit_delta)

    # The whole edit, with the same targets (MPES off): the written update is smaller too.
    handle = memit.edit(REQUESTS)
    memit_norm = handle.info[0]["delta_norms"][0]
    handle.restore()
    handle = encore.edit(REQUESTS)
    assert handle.info[0]["delta_norms"][0] < memit_norm
    handle.restore()


def test_encore_keeps_earlier_keys_in_the_normal_equation(make_tiny):
    lm = make_tiny("llama")
    editor = editkit.get_editor("encore", lm, layers=[1], update_norm_lambda=1e-3, mom2_update_weight=1.0, **FAST)
    session = EditSession(editor)
    session.apply(REQUESTS[0])
    earlier = editor.earlier_keys(1)
    assert earlier.shape[0] == 1
    keys = editor.mean_keys(REQUESTS[1:], 1).double()
    residuals = torch.ones(2, lm.model.config.hidden_size, dtype=torch.float64)
    with_earlier = editor.solve(0, 1, keys, residuals)
    without = editkit.get_editor("encore", lm, layers=[1], update_norm_lambda=1e-3, mom2_update_weight=1.0,
                                 add_prev_edits=False, **FAST).solve(0, 1, keys, residuals)
    # an earlier edit's key is protected: the new update moves it less
    assert (with_earlier @ earlier.T).norm() < (without @ earlier.T).norm()
    session.restore()
    assert editor.earlier_keys(1).shape[0] == 0


def test_mpes_stops_once_the_target_is_on_top(smollm2):
    """MPES (prob_cutoff < 0) stops at the |prob_cutoff|-th step with the target on top everywhere."""
    request = EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", "French")
    path = smollm2.adapter.path("blocks", 6)
    prefixes = ["", "Yesterday it rained. "]
    options = dict(v_lr=0.5, v_num_grad_steps=25, v_weight_decay=0.5, clamp_norm_factor=4.0, kl_factor=0.0625,
                   early_stop_loss=0.0)
    lengths = {cutoff: len(optimize_target_value(smollm2, request, path, prefixes, prob_cutoff=cutoff,
                                                 **options).losses) for cutoff in (0.0, -1.0, -2.0)}
    assert lengths[0.0] == 25, "without MPES every step runs"
    assert lengths[-1.0] < 25
    assert lengths[-1.0] < lengths[-2.0] < 25


# -- RECT and PRUNE -------------------------------------------------------------------------------

def test_rect_keeps_exactly_the_top_fraction_by_relative_change():
    generator = torch.Generator().manual_seed(0)
    delta, weight = torch.randn(40, 50, generator=generator), torch.randn(40, 50, generator=generator)
    kept = rect_sparsify(delta, weight, 0.2)
    mask = kept != 0
    assert int(mask.sum()) == 400
    assert torch.equal(kept[mask], delta[mask])
    change = delta.abs() / weight.abs()
    assert change[mask].min() >= change[~mask].max()


def test_rect_option_sparsifies_memits_written_update(make_tiny):
    lm = make_tiny("llama")
    editor = editkit.get_editor("memit", lm, layers=[0, 1], mom2_update_weight=1.0, rect_top_k=0.2, **FAST)
    before = {layer: weight_out_in(lm, editor, layer) for layer in (0, 1)}
    handle = editor.edit(REQUESTS[:2])
    for layer in (0, 1):
        changed = weight_out_in(lm, editor, layer) != before[layer]
        assert int(changed.sum()) == round(0.2 * changed.numel()), layer
    handle.restore()


def test_prune_restraint_function():
    values = torch.tensor([50.0, 8.0, 3.0, 1.0], dtype=torch.float64)
    restrained = prune_restraint(values, bound=3.0, alpha=1.2)
    expected = [math.log(50.0, 1.2) - math.log(3.0, 1.2) + 3.0, math.log(8.0, 1.2) - math.log(3.0, 1.2) + 3.0, 3.0,
                1.0]
    assert restrained.tolist() == pytest.approx(expected)
    matrix = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 10
    bound = float(torch.linalg.svdvals(matrix)[1])
    assert torch.linalg.svdvals(restrain_perturbation(matrix, bound, 2.0)).tolist() == pytest.approx(
        prune_restraint(torch.linalg.svdvals(matrix), bound, 2.0).tolist())


def test_prune_restrains_the_accumulated_perturbation(make_tiny):
    """Singular values of W − W0 at or above σ_max(W0) become F(σ); the smaller ones stay."""
    lm = make_tiny("llama")
    options = dict(layers=[1], mom2_update_weight=1e-3, clamp_norm_factor=100.0, **FAST)
    raw_editor = editkit.get_editor("memit", lm, **options)
    original = weight_out_in(lm, raw_editor, 1)
    bound = float(torch.linalg.matrix_norm(original, ord=2))
    handle = raw_editor.edit(REQUESTS[:2])
    raw = torch.linalg.svdvals(weight_out_in(lm, raw_editor, 1) - original)
    handle.restore()
    assert raw[0] > bound, "the test needs an update large enough for the restraint to act"

    # F shrinks σ only where F'(σ) = 1 / (σ ln α) < 1: a tiny model's σ_max(W0) is far below
    # 1 / ln 1.2 (the published α), so a larger base is used here.
    session = EditSession(editkit.get_editor("memit", lm, prune=True, prune_alpha=10.0, **options))
    session.apply(REQUESTS[:2])
    pruned = torch.linalg.svdvals(weight_out_in(lm, raw_editor, 1) - original)
    expected = prune_restraint(raw, bound, 10.0)
    assert float(pruned[0]) < float(raw[0])
    for i in range(2):  # a batch of two: a rank-2 perturbation
        assert float(pruned[i]) == pytest.approx(float(expected[i]), rel=1e-3), i
    session.apply(REQUESTS[2])  # a later edit: the accumulated perturbation is restrained again
    restrained = torch.linalg.svdvals(weight_out_in(lm, raw_editor, 1) - original)
    session.restore()
    assert torch.equal(weight_out_in(lm, raw_editor, 1), original)
    unrestrained = EditSession(raw_editor)
    unrestrained.apply(REQUESTS[:2])
    unrestrained.apply(REQUESTS[2])
    assert float(restrained[0]) < float(torch.linalg.svdvals(weight_out_in(lm, raw_editor, 1) - original)[0])
    unrestrained.restore()


def test_prune_resumed_from_saved_weights_restrains_as_if_it_never_stopped(make_tiny):
    """A run resumed from a checkpoint's weights restrains W − W0 against the unedited W0 (told by
    ``adopt_originals``), not against the saved weights: its next edit equals the uninterrupted one."""
    lm = make_tiny("llama")
    options = dict(layers=[1], mom2_update_weight=1e-3, clamp_norm_factor=100.0, prune=True, prune_alpha=10.0, **FAST)
    expected, resumed, saved = resume_against_straight(lambda: editkit.get_editor("memit", lm, **options),
                                                       REQUESTS[:2], REQUESTS[2])
    for path, value in expected.items():
        assert torch.allclose(resumed.edited_state()[path], value, rtol=0, atol=1e-6), path
    # Restrained against the saved weights instead, the perturbation would be the last edit's alone.
    against_saved = EditSession(editkit.get_editor("memit", lm, **options))
    with torch.no_grad():
        for path, value in saved.items():
            get_parameter(lm.model, path).copy_(value)
    against_saved.apply(REQUESTS[2])
    assert any(not torch.allclose(against_saved.edited_state()[p], v, rtol=0, atol=1e-6) for p, v in expected.items())
    against_saved.restore()
    resumed.restore()


# -- parameters ---------------------------------------------------------------------------------

def test_new_options_leave_earlier_digests_unchanged():
    """Run ids are ``<method>-<digest>``: options at their defaults must not move them (values before RECT/PRUNE)."""
    pinned = {ROMEParams: "8ddb9f579fa449a2", RROMEParams: "9087d93a6f4e03de", MEMITParams: "e093f1943724fc8c",
              PMETParams: "1f133f9cd39cbbe7", AlphaEditParams: "ea17e73a8981b52d"}
    for cls, digest in pinned.items():
        assert cls().digest() == digest, cls.__name__
        assert cls(rect_top_k=0.2).digest() != digest and cls(prune=True).digest() != digest
    assert MEMITParams(layers=(1,), v_num_grad_steps=8).digest() == "605ad65511bef53c"


def test_published_defaults_and_validation():
    emmet, encore = EMMETParams(), ENCOREParams()
    assert emmet.layers == (17,) and emmet.mom2_update_weight == 1000 and emmet.emmet_lambda == 0.1
    assert emmet.update_norm_lambda == 0 and emmet.clamp_norm_factor == 0.75
    assert encore.layers == (13, 14, 15, 16, 17) and encore.mom2_update_weight == 20000
    assert encore.update_norm_lambda == 10 and encore.prob_cutoff == -4 and encore.add_prev_edits is True
    with pytest.raises(ValueError, match="rect_top_k"):
        MEMITParams(rect_top_k=1.5)
    with pytest.raises(ValueError, match="prune_alpha"):
        ROMEParams(prune_alpha=1.0)
    with pytest.raises(ValueError, match="emmet_lambda"):
        EMMETParams(emmet_lambda=-1.0)

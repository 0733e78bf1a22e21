"""MEND: the untrained network is a gradient step, training learns and is stored once, exact restore, resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import editkit
import editkit.editors.trainer
from editkit.editors import resolve_params
from editkit.editors.gradients import TargetPass, token_factors
from editkit.editors.mend import MEND, MENDNet, MENDParams, MENDTrainable, _low_rank_hook
from editkit.editors.trainer import train_editor
from editkit.training import ArtifactError, MissingArtifactError, fit, training_data
from editkit.types import EditRequest

from .helpers import snapshot, target_logprob

REQUESTS = [
    EditRequest("The capital of France is", "France", "Rome", case_id="a"),
    EditRequest("Danielle Darrieux's mother tongue is", "Danielle Darrieux", "English", case_id="b"),
]
# A few dozen optimiser steps of a rank-16 network on a 3-layer model: seconds on one thread.
TINY = dict(rank=16, lr=1e-3, lr_lr=1e-3, edit_lr=1e-3, cedit=1.0, accumulate_bs=4, max_iters=120, train_records=8,
            val_records=4, checkpoint_every=10)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch, one_torch_thread):
    """Trained artifacts go to a per-test folder, never to the user's cache."""
    monkeypatch.setenv("EDITKIT_CACHE", str(tmp_path / "cache"))


def untrained(lm, **overrides) -> MEND:
    params = resolve_params("mend", lm, **overrides)
    return MEND(lm, params, net=MENDNet.for_model(lm, params))


def changed(lm, before: dict[str, torch.Tensor]) -> set[str]:
    return {name for name, tensor in lm.model.state_dict().items() if not torch.equal(tensor, before[name])}


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt", "gptj", "gpt_neox", "qwen3", "gemma2"])
def test_untrained_network_makes_a_plain_gradient_step(make_tiny, model_type):
    """g starts as the identity (and empty statistics standardise nothing): ΔW = −edit_lr ∇W L."""
    lm = make_tiny(model_type)
    editor = untrained(lm, edit_lr=1e-2, rank=8)
    # model_types entries: the last three blocks' MLP weights (Llama's gate projection too).
    assert len(editor.module_paths) == (9 if model_type in ("llama", "qwen3", "gemma2") else 6)
    weights = [lm.model.get_parameter(f"{p}.weight") for p in editor.module_paths]
    # autograd's gradient of the same loss: mean NLL over every target token of both requests.
    batch, queries, labels = TargetPass(), [], []
    for request in REQUESTS:
        rows, answer = batch.add_target(lm.tokenizer, request.prompt, request.target_new)
        queries += rows
        labels += answer
    for w in weights:
        w.requires_grad_(True)
    log_probs, _ = batch.log_probs(lm)
    grads = torch.autograd.grad(-log_probs[queries, labels].mean(), weights)
    for w in weights:
        w.requires_grad_(False)
    before = snapshot(lm)
    handle = editor.edit(REQUESTS)
    for path, w, grad in zip(editor.module_paths, weights, grads):
        torch.testing.assert_close(w.detach() - before[f"{path}.weight"], -1e-2 * grad, rtol=1e-4, atol=1e-8)
    assert changed(lm, before) == {f"{p}.weight" for p in editor.module_paths}
    assert not any(p.requires_grad or p.grad is not None for p in lm.model.parameters())
    assert [i["case_id"] for i in handle.info] == ["a", "b"] and all(i["delta_norm"] > 0 for i in handle.info)
    handle.restore()
    assert not changed(lm, before), "restore() must be bit-exact"


@pytest.mark.parametrize("model_type", ["gpt2", "opt"])
def test_training_hook_equals_the_weight_update(make_tiny, model_type):
    """The differentiable edit used in training (a hook adding −α Σ δ̃ ũᵀ x) is the edit `edit()` writes."""
    lm = make_tiny(model_type)  # OPT's MLP sees batch and positions flattened
    editor = untrained(lm, rank=8, edit_lr=1e-2)
    torch.manual_seed(1)
    with torch.no_grad():  # a network that is not the identity
        for name, p in editor.net.named_parameters():
            if name.endswith(".up"):
                p.normal_(0, 0.1)
    probe = TargetPass()
    probe.add_target(lm.tokenizer, "The Eiffel Tower is in", "Paris")
    factors, _, _ = token_factors(lm, editor.module_paths, [REQUESTS])
    with torch.no_grad():
        per_path = [[editor.net.factors(i, u, d)] for i, (u, d, _) in enumerate(factors)]
        hooks = [(path, _low_rank_hook(f, [(0, 1)])) for path, f in zip(editor.module_paths, per_path)]
        hooked, _ = probe.log_probs(lm, hooks)
    handle = editor.edit(REQUESTS)
    written, _ = probe.log_probs(lm)
    handle.restore()
    torch.testing.assert_close(hooked, written, rtol=1e-4, atol=1e-5)


def test_training_learns_saves_and_is_reused(make_tiny, monkeypatch):
    lm = make_tiny("llama")
    folder = train_editor("mend", lm, progress=False, **TINY)
    history = json.loads((folder / "history.json").read_text())
    assert len(history) == 30
    early, late = (sum(h["loss"] for h in part) / 8 for part in (history[:8], history[-8:]))
    assert late < early - 0.1, (early, late)
    assert [h["step"] for h in history if "val_loc_kl" in h] == [10, 20, 30]
    state = load_file(folder / "weights.safetensors")
    assert float(state["transforms.32x64.u_moments.count"]) > 0, "normalisation statistics must be saved"
    assert not torch.equal(state["edit_lrs"], torch.full_like(state["edit_lrs"], 1e-3))
    ups = [v for k, v in state.items() if k.endswith(".up")]
    assert ups and all(v.abs().sum() > 0 for v in ups), "g itself must learn (its zero-initialised factors move)"

    editor = editkit.get_editor("mend", lm, **TINY)  # finds the artifact through EDITKIT_CACHE
    assert torch.equal(editor.net.edit_lrs.detach(), state["edit_lrs"])
    before = snapshot(lm)
    logprob = target_logprob(lm, REQUESTS[0].prompt, REQUESTS[0].target_new)
    handle = editor.edit(REQUESTS[0])
    assert target_logprob(lm, REQUESTS[0].prompt, REQUESTS[0].target_new) > logprob
    handle.restore()
    assert not changed(lm, before)

    # Asked again: the same folder, without training.
    mtime = (folder / "weights.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(editkit.editors.trainer, "fit", lambda *a, **k: pytest.fail("retrained"))
    assert train_editor("mend", lm, progress=False, **TINY) == folder
    assert (folder / "weights.safetensors").stat().st_mtime_ns == mtime

    # Other hyperparameters name another artifact; a corrupted file is refused.
    with pytest.raises(MissingArtifactError, match="--set rank=8"):
        editkit.get_editor("mend", lm, **{**TINY, "rank": 8})
    data = bytearray((folder / "weights.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (folder / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="corrupted"):
        editkit.get_editor("mend", lm, **TINY)


def test_missing_artifact_says_how_to_train(make_tiny):
    with pytest.raises(MissingArtifactError, match="python -m editkit train mend --model tiny-gpt2"):
        editkit.get_editor("mend", make_tiny("gpt2"))


def test_interrupted_training_resumes_to_the_same_weights(make_tiny, tmp_path):
    lm = make_tiny("llama")
    params = resolve_params("mend", lm, **{**TINY, "max_iters": 24, "checkpoint_every": 2, "val_records": 2})
    train, val, _ = training_data("counterfact", 8, 2)
    fingerprint = MEND.artifact_key(lm, params).meta()

    class Interrupted(MENDTrainable):
        calls = 0

        def loss(self, batch):
            Interrupted.calls += 1
            if Interrupted.calls > 5:
                raise KeyboardInterrupt
            return super().loss(batch)

    straight = MEND.trainable(lm, params, train, val)
    fit(straight, tmp_path / "a", seed=params.seed, checkpoint_every=2, fingerprint=fingerprint, progress=False)
    with pytest.raises(KeyboardInterrupt):
        fit(Interrupted(lm, params, train, val), tmp_path / "b", seed=params.seed, checkpoint_every=2,
            fingerprint=fingerprint, progress=False)
    again = MEND.trainable(lm, params, train, val)
    history = fit(again, tmp_path / "b", seed=params.seed, checkpoint_every=2, fingerprint=fingerprint,
                  progress=False)
    assert len(history) == 6
    for name, value in straight.module.state_dict().items():
        assert torch.equal(value, again.module.state_dict()[name]), name


def test_params_defaults_validation_and_configs(make_tiny, smollm2):
    params = MENDParams()  # EasyEdit hparams/TRAINING/MEND/gpt2-xl.yaml
    assert params.layers == (45, 46, 47) and set(params.roles) == {"mlp_in", "mlp_out"}
    assert (params.rank, params.n_hidden, params.init, params.norm, params.combine, params.shared) == \
        (1920, 1, "id", True, True, True)
    assert (params.edit_lr, params.lr, params.lr_lr, params.cedit, params.cloc, params.grad_clip) == \
        (1e-4, 1e-6, 1e-4, 0.1, 1.0, 100.0)
    assert (params.batch_size, params.accumulate_bs, params.max_iters, params.seed) == (1, 10, 100_000, 42)
    for bad, match in (({"layers": ()}, "layers"), ({"rank": 0}, "rank"), ({"cedit": 0.0, "cloc": 0.0}, "cedit"),
                       ({"edit_loss_on": "all"}, "edit_loss_on"), ({"accumulate_bs": 0}, "accumulate_bs"),
                       ({"train_data": "wiki"}, "train_data")):
        with pytest.raises(ValueError, match=match):
            MENDParams().replace(**bad)
    with pytest.raises(ValueError, match="out of range"):
        editkit.get_editor("mend", make_tiny("llama"), layers=[3])

    # The offline model's defaults are the smoke preset, so both find the same artifact.
    assert resolve_params("mend", smollm2) == resolve_params("mend", smollm2, preset="smoke")
    lm = make_tiny("llama")
    for name, layers, roles in (("gpt2-xl", (45, 46, 47), 2), ("EleutherAI/gpt-j-6B", (25, 26, 27), 2),
                                ("meta-llama/Llama-2-7b-hf", (29, 30, 31), 3)):
        lm.name = name
        resolved = resolve_params("mend", lm)
        assert resolved.layers == layers and len(resolved.roles) == roles
        assert resolve_params("mend", lm, preset="paper").to_dict() == resolved.to_dict()

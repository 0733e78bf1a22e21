"""SERAC's trained counterfactual model: its training, and in-scope inputs answered by it, not by the edited model."""

from __future__ import annotations

import pytest
import torch

from editkit.benchmarks import Engine, GenerationRequest
from editkit.datasets import load_counterfact
from editkit.editors import resolve_params
from editkit.editors.serac import SERAC, SERACParams
from editkit.editors.serac_cf import CounterfactualTrainable, counterfactual_lm
from editkit.routing import Delegated
from editkit.training import fit
from editkit.types import EditRequest
from tests.helpers import trained_editor

FAST = {"encoder": "all-minilm-l6-v2", "counterfactual": "trained", "steps": 4, "batch_size": 4,
        "train_records": 16, "val_records": 4, "checkpoint_every": 2, "cf_lr": 1e-3}
UNRELATED = "The capital of Japan is"

pytestmark = pytest.mark.usefixtures("session_cache", "one_torch_thread")


@pytest.fixture(scope="module")
def request_() -> EditRequest:
    return load_counterfact("edit", 2)[1]


@pytest.fixture
def editor(make_tiny):
    return trained_editor("serac", make_tiny("llama"), **FAST)


def test_in_scope_inputs_are_answered_by_the_trained_model(editor, request_):
    lm, cf = editor.lm, editor.counterfactual
    assert cf is not None and cf.model is not lm.model
    differs = [not torch.equal(a, b) for a, b in zip(cf.model.parameters(), lm.model.parameters())]
    assert any(differs), "the trained counterfactual model must differ from the edited model"
    target = " " + request_.target_new
    engine = Engine(lm, batch_size=4, progress=False)
    before = engine.score([(request_.prompt, target), (UNRELATED, " Tokyo")])
    handle = editor.edit(request_)
    routed = editor.route([request_.prompt, UNRELATED])
    assert isinstance(routed[0], Delegated) and routed[0].lm is cf and routed[1] == UNRELATED
    text = f"{request_.prompt} {request_.target_new}\n{request_.prompt}"
    assert routed[0] == text
    after = engine.score([(request_.prompt, target), (UNRELATED, " Tokyo")])
    by_cf = Engine(cf, batch_size=4, progress=False).score([(text, target)])[0]
    by_base = engine.score([(text, target)])[0]  # the conditioned variant's answer (no edit stored for it)
    assert after[0].logprob == pytest.approx(by_cf.logprob, abs=1e-5)
    assert abs(after[0].logprob - by_base.logprob) > 1e-3, "the edited model must not answer in-scope inputs"
    assert after[1].logprob == before[1].logprob, "an out-of-scope input sees the untouched model"
    # Generation too: the counterfactual model's greedy continuation of the routed text.
    generated = engine.generate_until([GenerationRequest(request_.prompt, (), 3)])[0]
    assert generated == Engine(cf, batch_size=1, progress=False).generate_until([GenerationRequest(text, (), 3)])[0]
    handle.restore()
    assert lm.context_routers == [] and engine.score([(request_.prompt, target)])[0].logprob == before[0].logprob


def test_joint_training_lowers_the_counterfactual_nll(make_tiny, tmp_path):
    lm = make_tiny("llama")
    params = resolve_params("serac", lm, **{**FAST, "steps": 8})
    train = load_counterfact("train", 24)
    trainable = SERAC.trainable(lm, params, train, [])
    fixed = train[:4]
    nll = trainable.counterfactual.nll
    with torch.no_grad():
        before = nll(fixed).item()
    fit(trainable, tmp_path, progress=False, checkpoint_every=100)
    with torch.no_grad():
        after = nll(fixed).item()
    assert after < before - 0.2, (before, after)  # 10.8 -> 10.45 nats on the tiny random Llama
    assert set(trainable.module) == {"classifier", "counterfactual"}


def test_cf_records_limits_the_counterfactual_batch(make_tiny):
    lm = make_tiny("llama")
    params = resolve_params("serac", lm, **{**FAST, "cf_records": 1})
    records = load_counterfact("train", 3)
    trainable = CounterfactualTrainable(counterfactual_lm(lm, params), params, [])
    with torch.no_grad():
        assert trainable.loss(records)[0].item() == pytest.approx(trainable.nll(records[:1]).item(), abs=1e-6)


def test_variants_have_their_own_artifacts_and_bad_values_raise(make_tiny):
    lm = make_tiny("llama")
    trained = SERAC.artifact_key(lm, resolve_params("serac", lm, **FAST))
    conditioned = SERAC.artifact_key(lm, resolve_params("serac", lm, **{**FAST, "counterfactual": "conditioned"}))
    assert trained.directory() != conditioned.directory() and lm.name in trained.model
    assert SERACParams().counterfactual == "trained", "the published SERAC trains its counterfactual model"
    with pytest.raises(ValueError, match="counterfactual must be"):
        SERACParams(counterfactual="retrieved")
    with pytest.raises(ValueError, match="cf_lr must be positive"):
        SERACParams(cf_lr=0.0)

"""SERAC: the edit memory, the scope classifier's routing, its training and its artifact."""

from __future__ import annotations

import pytest
import torch

import editkit
from editkit.__main__ import main
from editkit.benchmarks import Engine
from editkit.datasets import load_counterfact
from editkit.editors import resolve_params
from editkit.editors.serac import SERAC, ScopeTrainable
from editkit.training import MissingArtifactError, fit
from tests.helpers import target_logprob, trained_editor

# The conditioned variant (tests/test_serac_cf.py has the trained counterfactual model).
FAST = {"encoder": "all-minilm-l6-v2", "counterfactual": "conditioned", "steps": 4, "batch_size": 4,
        "train_records": 16, "val_records": 4, "checkpoint_every": 2}
UNRELATED = "The capital of Japan is"


pytestmark = pytest.mark.usefixtures("session_cache", "one_torch_thread")


@pytest.fixture(scope="module")
def requests():
    return load_counterfact("edit", 4)


@pytest.fixture
def editor(make_tiny):
    return trained_editor("serac", make_tiny("llama"), **FAST)


def test_in_scope_contexts_go_to_the_counterfactual_model_and_others_do_not(editor, requests):
    request = requests[0]
    assert editor.route([request.prompt]) == [request.prompt], "an empty memory routes nothing"
    handle = editor.edit(request)
    assert editor.lm.context_routers == [editor]
    statement = f"{request.prompt} {request.target_new}"
    routed = editor.route([request.prompt, request.rephrase_prompts[0], UNRELATED])
    assert routed[0] == f"{statement}\n{request.prompt}"
    assert routed[1] == f"{statement}\n{request.rephrase_prompts[0]}"
    assert routed[2] == UNRELATED
    assert handle.info[0]["prompt_in_scope"] > 0.5
    handle.restore()
    assert editor.lm.context_routers == [] and editor.route([request.prompt]) == [request.prompt]


def test_the_engine_scores_routed_contexts(editor, requests):
    request = requests[1]
    lm = editor.lm
    engine = Engine(lm, batch_size=4, progress=False)
    before = engine.loglikelihood([(request.prompt, " " + request.target_new), (UNRELATED, " Tokyo")])
    conditioned = engine.loglikelihood([(f"{request.prompt} {request.target_new}\n{request.prompt}",
                                         " " + request.target_new)])
    handle = editor.edit(request)
    after = engine.loglikelihood([(request.prompt, " " + request.target_new), (UNRELATED, " Tokyo")])
    assert after[0] == conditioned[0] and after[0] != before[0]
    assert after[1] == before[1], "an out-of-scope input must see the untouched base model"
    handle.restore()
    assert engine.loglikelihood([(request.prompt, " " + request.target_new)])[0] == before[0]


def test_sequential_edits_retrieve_their_own_edit_and_undo_in_any_order(editor, requests):
    handles = [editor.edit(r) for r in requests[:3]]
    for request in requests[:3]:
        assert editor.route([request.prompt])[0].startswith(f"{request.prompt} {request.target_new}\n")
    handles[1].restore()
    assert editor.route([requests[1].prompt]) == [requests[1].prompt]
    assert editor.route([requests[2].prompt])[0].startswith(f"{requests[2].prompt} {requests[2].target_new}")
    state = editor.state_dict()
    fresh = editkit.get_editor("serac", editor.lm, **FAST)
    editor.reset()
    assert editor.lm.context_routers == []
    fresh.load_state_dict(state)
    assert fresh.memory.texts == [f"{r.prompt} {r.target_new}" for r in (requests[0], requests[2])]
    assert fresh.lm.context_routers == [fresh]
    fresh.reset()


def test_training_separates_in_scope_from_out_of_scope_pairs(make_tiny, tmp_path):
    lm = make_tiny("llama")
    params = resolve_params("serac", lm, **{**FAST, "steps": 12, "lr": 1e-4, "batch_size": 6})
    train = load_counterfact("train", 30)
    trainable = SERAC.trainable(lm, params, train, [])
    fixed = train[:6]
    with torch.no_grad():
        before = trainable.loss(fixed)[0].item()
    fit(trainable, tmp_path, progress=False, checkpoint_every=100)
    with torch.no_grad():
        after = trainable.loss(fixed)[0].item()
    assert after < before * 0.8, (before, after)


def test_missing_classifier_names_the_train_command(make_tiny):
    lm = make_tiny("llama")
    with pytest.raises(MissingArtifactError, match="python -m editkit train serac .*--set steps=3"):
        editkit.get_editor("serac", lm, **{**FAST, "steps": 3})


def test_scope_pairs_label_own_prompts_in_scope(requests):
    edits, queries, labels = ScopeTrainable.pairs(requests[:2])
    assert len(edits) == 2 and labels.shape == (2, len(queries))
    own = [q for q, flag in zip(queries, labels[0].tolist()) if flag]
    assert own == [requests[0].prompt, *requests[0].rephrase_prompts]
    assert requests[0].locality_prompts[0] in queries and labels.sum() == len(own) + 1 + len(requests[1].rephrase_prompts)


def test_train_command_trains_once_and_then_reuses(smollm2, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDITKIT_CACHE", str(tmp_path))
    args = ["train", "serac", "--quiet"] + [f"--set={k}={v}" for k, v in {**FAST, "steps": 2}.items()]
    assert main(args) == 0
    folder = capsys.readouterr().out.strip().splitlines()[-1]
    weights = tmp_path / folder / "weights.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert main(args) == 0
    assert weights.stat().st_mtime_ns == stamp, "an existing artifact must not be retrained"
    lm = smollm2
    editor = editkit.get_editor("serac", lm, **{**FAST, "steps": 2})
    request = load_counterfact("edit", 2)[1]
    before = target_logprob(lm, request.prompt, request.target_new)
    handle = editor.edit(request)
    assert target_logprob(lm, request.prompt, request.target_new) > before + 1.0
    handle.restore()
    assert lm.context_routers == []

"""GRACE: the contract (target rises, weights untouched, exact restore, determinism), the
codebook rules, saved state, and the key token under the evaluation engine's batching."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import editkit
from editkit.benchmarks import Engine, GenerationRequest
from editkit.datasets import load_counterfact
from editkit.editing import EditSession
from editkit.editors.grace import GRACEParams
from editkit.hooks import get_module
from editkit.tokens import encode
from editkit.types import EditRequest
from tests.helpers import target_logprob

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Tiny models: GPT-2's c_fc input (the published GPT2-XL choice) has keys ~7 apart, so the
# published eps=1 separates prompts; Llama's down_proj input is ~0.06 apart, so eps is scaled.
# OPT's MLP sees (batch·positions) x width, the case where rows and positions are not separate.
SETUPS = {"gpt2": dict(layers=[1], role="mlp_in", eps=1.0), "llama": dict(layers=[1], role="mlp_out", eps=0.01),
          "opt": dict(layers=[1], role="mlp_in", eps=1.0)}
FAST = dict(n_iter=25)
REQUEST = EditRequest("The Eiffel Tower is located in the city of", "The Eiffel Tower", "Rome", "Paris", case_id="t")
OTHER = EditRequest("Danielle Darrieux speaks the language", "Danielle Darrieux", "English", "French", case_id="o")
FAR = ["The capital of Japan is", "My favourite food is"]


def logits(lm, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(torch.tensor([encode(lm.tokenizer, prompt)], device=lm.device)).logits


def snapshot(lm) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def assert_same_state(lm, original: dict[str, torch.Tensor]) -> None:
    for name, tensor in lm.model.state_dict().items():
        assert torch.equal(tensor, original[name]), f"{name} changed"


def editor_for(lm, model_type: str, **overrides):
    return editkit.get_editor("grace", lm, **{**SETUPS[model_type], **FAST, **overrides})


def hooks_on(lm, editor) -> int:
    return len(get_module(lm.model, editor.module_path)._forward_hooks)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt"])
def test_edit_raises_target_keeps_weights_and_restores_exactly(make_tiny, model_type):
    lm = make_tiny(model_type)
    original = snapshot(lm)
    prompts = [REQUEST.prompt, *FAR]
    before = {p: logits(lm, p) for p in prompts}
    logp_before = target_logprob(lm, REQUEST.prompt, REQUEST.target_new)
    editor = editor_for(lm, model_type)
    handle = editor.edit(REQUEST)
    assert hooks_on(lm, editor) == 1 and len(editor.codebook) == 1
    # (a tiny random head bounds the logits to about ±0.6)
    assert target_logprob(lm, REQUEST.prompt, REQUEST.target_new) > logp_before + 0.3
    assert_same_state(lm, original)  # the adaptor is a hook: no weight changes
    for prompt in FAR:  # inputs outside every ball run the model unchanged, bit for bit
        assert torch.equal(logits(lm, prompt), before[prompt])
    info = handle.info[0]
    assert info["action"] == "added" and len(info["losses"]) == FAST["n_iter"]
    assert info["losses"][-1] < info["losses"][0]
    handle.restore()
    assert hooks_on(lm, editor) == 0 and len(editor.codebook) == 0
    for prompt in prompts:
        assert torch.equal(logits(lm, prompt), before[prompt])
    assert_same_state(lm, original)


def test_reset_and_session_restore_remove_everything(make_tiny):
    lm = make_tiny("gpt2")
    before = logits(lm, REQUEST.prompt)
    editor = editor_for(lm, "gpt2")
    editor.edit([REQUEST, OTHER])  # a batch: applied one after another
    assert len(editor.codebook) == 2
    editor.reset()
    assert hooks_on(lm, editor) == 0 and len(editor.codebook) == 0
    assert torch.equal(logits(lm, REQUEST.prompt), before)
    session = EditSession(editor)
    session.apply(REQUEST)
    assert not torch.equal(logits(lm, REQUEST.prompt), before)
    session.restore()
    assert hooks_on(lm, editor) == 0 and torch.equal(logits(lm, REQUEST.prompt), before)


def test_same_seed_same_codebook_and_seed_matters(make_tiny):
    lm = make_tiny("llama")
    books = []
    for seed in (0, 0, 1):
        editor = editor_for(lm, "llama", seed=seed)
        handle = editor.edit(REQUEST)
        books.append(editor.codebook.state_dict())
        handle.restore()
    assert all(torch.equal(books[0][k], books[1][k]) for k in ("keys", "values", "radii"))
    assert not torch.equal(books[0]["values"], books[2]["values"]), "cold init must follow the seed"


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt"])
def test_blocks_below_the_adaptor_run_once_per_edit_with_the_same_codebook(make_tiny, model_type):
    """Training reuses the output of the blocks below the adapted one: the same codebook, bit for bit."""
    lm = make_tiny(model_type)
    inside = next(m for m in get_module(lm.model, lm.adapter.blocks)[0].modules()
                  if not list(m.children()) and hasattr(m, "weight"))  # a layer inside block 0
    books, calls = [], []
    for skip in (True, False):
        editor = editor_for(lm, model_type)
        editor.skip_below = skip
        seen = []
        hook = inside.register_forward_hook(lambda *_: seen.append(1))  # block 0's own hooks fire when skipped
        try:
            handle = editor.edit([REQUEST, OTHER])
        finally:
            hook.remove()
        books.append(editor.codebook.state_dict())
        calls.append(len(seen))
        handle.restore()
    for key in ("keys", "values", "radii"):
        assert torch.equal(books[0][key], books[1][key]), key
    # Without the skip block 0 runs at every one of the 2 x 25 steps; with it, a few times per edit.
    assert calls[1] >= 2 * FAST["n_iter"] and calls[0] <= 2 * 4


def test_state_dict_reproduces_edits_on_a_fresh_editor(make_tiny):
    lm = make_tiny("gpt2")
    before = logits(lm, REQUEST.prompt)
    editor = editor_for(lm, "gpt2")
    editor.edit([REQUEST, OTHER])
    edited = {p: logits(lm, p) for p in (REQUEST.prompt, OTHER.prompt)}
    state = editor.state_dict()
    editor.reset()
    fresh = editor_for(lm, "gpt2")
    fresh.load_state_dict(state)
    for prompt, expected in edited.items():
        assert torch.equal(logits(lm, prompt), expected)
    # Resuming continues the id sequence, and an empty state empties the codebook.
    fresh.edit(EditRequest("Tokyo is a city in", "Tokyo", "Italy", case_id="n"))
    assert fresh.codebook.ids == [0, 1, 2]
    fresh.load_state_dict({})
    assert hooks_on(lm, fresh) == 0 and torch.equal(logits(lm, REQUEST.prompt), before)
    with pytest.raises(ValueError, match="layer"):
        editor_for(lm, "gpt2", layers=[2]).load_state_dict(state)


def test_growth_rules_expand_split_relabel_and_exact_undo(make_tiny):
    lm = make_tiny("gpt2")
    near = EditRequest("The Eiffel Tower is in the city of", "The Eiffel Tower", "Rome", case_id="near")
    london = EditRequest(near.prompt, near.subject, "London", case_id="london")
    probe = editor_for(lm, "gpt2", eps=50.0, n_iter=1)
    probe.edit(REQUEST)
    covered = probe.edit(near).info[0]
    assert covered["action"] == "covered" and len(probe.codebook) == 1
    distance = covered["distance"]
    probe.reset()
    # eps < distance <= 2 eps: the balls of the two prompts would overlap.
    eps = 0.75 * distance
    editor = editor_for(lm, "gpt2", eps=eps)
    first = editor.edit(REQUEST)
    expanded = editor.edit(near)  # same label: coverage grows the radius to the distance
    assert expanded.info[0]["action"] == "expanded" and len(editor.codebook) == 1
    assert float(editor.codebook.radii[0]) == pytest.approx(distance)
    expanded.restore()
    assert float(editor.codebook.radii[0]) == pytest.approx(eps)
    split = editor.edit(london)  # another label: a new entry, both radii halved
    assert split.info[0]["action"] == "split" and len(editor.codebook) == 2
    assert float(editor.codebook.radii[0]) == pytest.approx(distance / 2 - 1e-5)
    assert float(editor.codebook.radii[1]) == pytest.approx(distance / 2)
    assert target_logprob(lm, REQUEST.prompt, "Rome") > target_logprob(lm, REQUEST.prompt, "London")
    assert target_logprob(lm, near.prompt, "London") > target_logprob(lm, near.prompt, "Rome")
    saved = editor.codebook.state_dict()
    relabel = editor.edit(EditRequest(REQUEST.prompt, REQUEST.subject, "Berlin", case_id="relabel"))
    assert relabel.info[0]["action"] == "relabelled" and len(editor.codebook) == 2
    relabel.restore()  # key, value, radius and label of the entry come back exactly
    restored = editor.codebook.state_dict()
    for k in ("keys", "values", "radii"):
        assert torch.equal(saved[k], restored[k]), (k, saved[k], restored[k])
    assert saved["labels"] == restored["labels"]
    split.restore()
    assert len(editor.codebook) == 1 and float(editor.codebook.radii[0]) == pytest.approx(eps)
    first.restore()
    assert len(editor.codebook) == 0 and hooks_on(lm, editor) == 0
    # moving_average: the key moves half way to the new query.
    alone = editor_for(lm, "gpt2", n_iter=1)
    alone.edit(near)
    query = alone.codebook.keys[0].clone()
    alone.reset()
    moving = editor_for(lm, "gpt2", eps=eps, n_iter=1, eps_expand="moving_average")
    moving.edit(REQUEST)
    key = moving.codebook.keys[0].clone()
    moving.edit(near)
    assert torch.allclose(moving.codebook.keys[0], (key + query) / 2)
    moving.reset()


@pytest.mark.parametrize("options", [dict(replacement="replace_prompt"), dict(replacement="replace_all"),
                                     dict(val_init="warm")])
def test_other_options_raise_the_target(make_tiny, options):
    lm = make_tiny("gpt2")
    before = target_logprob(lm, REQUEST.prompt, REQUEST.target_new)
    far = logits(lm, FAR[0])
    handle = editor_for(lm, "gpt2", **options).edit(REQUEST)
    assert target_logprob(lm, REQUEST.prompt, REQUEST.target_new) > before
    assert torch.equal(logits(lm, FAR[0]), far)
    handle.restore()


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt"])
def test_engine_batching_padding_and_cached_prefix_see_the_edit(make_tiny, model_type):
    """The key token is found whatever the batching: the engine's left-padded batches, its shared
    few-shot prefix run once, and step-wise generation give the single-pass scores."""
    lm = make_tiny(model_type)
    shots = "Question: where is the Colosseum? Answer: Rome.\nQuestion: where is Big Ben? Answer: London.\n"
    long_request = EditRequest(shots + REQUEST.prompt, REQUEST.subject, REQUEST.target_new, case_id="shots")
    queries = [(REQUEST.prompt, " Rome"), (long_request.prompt, " Rome"), (shots + "Tokyo is in", " Japan"),
               (FAR[0], " Tokyo"), (REQUEST.prompt, " Paris")]
    unedited = [target_logprob(lm, context, continuation) for context, continuation in queries]
    editor = editor_for(lm, model_type)
    editor.edit([REQUEST, long_request])
    engine = Engine(lm, batch_size=8, progress=False)
    batched = [s.logprob for s in engine.score(queries)]
    alone = [target_logprob(lm, context, continuation) for context, continuation in queries]
    assert batched == pytest.approx(alone, abs=1e-4)
    assert alone[0] > unedited[0] and alone[1] > unedited[1]  # both edits fire, on their own prompts
    assert alone[2:4] == pytest.approx(unedited[2:4], abs=1e-6)  # the shared prefix alone does not
    engine.share_prefix = False
    assert [s.logprob for s in engine.score(queries)] == pytest.approx(alone, abs=1e-4)
    # Greedy generation: the first generated token is the edited argmax.
    text = engine.generate_until([GenerationRequest(REQUEST.prompt, (), 2), GenerationRequest(FAR[0], (), 2)])[0]
    first = int(logits(lm, REQUEST.prompt)[0, -1].argmax())
    assert text.startswith(lm.tokenizer.decode([first]))


def test_params_defaults_and_validation(make_tiny):
    params = GRACEParams()
    published = (params.layers, params.role, params.n_iter, params.edit_lr, params.eps)
    assert published == ((35,), "mlp_in", 200, 1.0, 1.0)
    assert (params.val_init, params.replacement, params.eps_expand) == ("cold", "replace_last", "coverage")
    with pytest.raises(ValueError, match="exactly one layer"):
        GRACEParams(layers=(1, 2))
    with pytest.raises(ValueError, match="positive"):
        GRACEParams(eps=0.0)
    with pytest.raises(ValueError, match="replacement"):
        GRACEParams().replace(replacement="replace_first")
    with pytest.raises(ValueError, match="out of range"):
        editkit.get_editor("grace", make_tiny("llama"), layers=[17])
    assert editkit.get_editor("grace", make_tiny("llama"), layers=[1]).params.role == "mlp_out"  # model_types row


def test_grace_edits_smollm2(smollm2):
    """Real model, packaged SmolLM2 settings (fewer steps): the edit takes, neighbours do not move."""
    request = load_counterfact("edit", 1)[0]
    original = snapshot(smollm2)
    neighbour = request.locality_prompts[0]
    before = logits(smollm2, neighbour)
    editor = editkit.get_editor("grace", smollm2, n_iter=15)
    handle = editor.edit(request)
    assert target_logprob(smollm2, request.prompt, request.target_new) > \
        target_logprob(smollm2, request.prompt, request.target_true)
    assert torch.equal(logits(smollm2, neighbour), before)
    handle.restore()
    assert_same_state(smollm2, original)


def test_sequential_run_resumes_with_the_saved_codebook(make_tiny, tmp_path):
    """A run killed after a checkpoint reloads the codebook and gives the clean run's numbers."""
    from editkit.runs import StudyConfig, run_study

    class Killed(Exception):
        pass

    def config(folder):
        return StudyConfig.from_dict(dict(
            model="tiny", methods=["grace"], n_edits=3, checkpoints=[0, 1, 2, 3], tasks=["mmlu_cloze"], limit=2,
            n_generation_examples=1, max_new_tokens=4, results_dir=str(tmp_path / folder),
            editor_overrides={"grace": {**SETUPS["gpt2"], "n_iter": 5}}))

    lm = make_tiny("gpt2")
    clean = run_study(config("clean"), progress=False, lm=lm)

    def kill_after_two(n, run_id):
        if n == 2:
            raise Killed

    with pytest.raises(Killed):
        run_study(config("killed"), progress=False, lm=lm, on_checkpoint=kill_after_two)
    resumed = run_study(config("killed"), progress=False, lm=lm)
    for frame in ("edit_quality", "scores"):
        pd.testing.assert_frame_equal(getattr(resumed, frame).drop(columns="run_id").reset_index(drop=True),
                                      getattr(clean, frame).drop(columns="run_id").reset_index(drop=True))


def test_bad_input_gives_clear_errors_and_leaves_nothing_behind(make_tiny):
    lm = make_tiny("opt")
    before = logits(lm, REQUEST.prompt)
    editor = editor_for(lm, "opt", replacement="replace_all")
    with pytest.raises(RuntimeError, match="flattens"):  # OPT: no (batch, position) split to replace by row
        editor.edit(REQUEST)
    assert len(editor.codebook) == 0 and hooks_on(lm, editor) == 0
    assert torch.equal(logits(lm, REQUEST.prompt), before)
    good = editor_for(lm, "opt")
    good.edit(REQUEST)
    state = good.state_dict()
    state["codebook"]["ids"] = state["codebook"]["ids"] + [7]
    with pytest.raises(ValueError, match="differ in length"):
        editor_for(lm, "opt").load_state_dict(state)
    good.reset()


def test_a_stale_handle_does_not_touch_a_newer_codebook(make_tiny):
    lm = make_tiny("gpt2")
    editor = editor_for(lm, "gpt2")
    stale = editor.edit(REQUEST)
    editor.reset()
    editor.edit(OTHER)  # reuses entry id 0 in a new codebook
    edited = logits(lm, OTHER.prompt)
    stale.restore()
    assert len(editor.codebook) == 1 and torch.equal(logits(lm, OTHER.prompt), edited)
    editor.reset()

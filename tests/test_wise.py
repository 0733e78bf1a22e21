"""WISE: the side memory is a hook (weights untouched, exact restore), routing per row, saved state,
sharding and TIES merging, parameter validation, and the target rising on SmolLM2."""

from __future__ import annotations

import pytest
import torch

import editkit
from editkit.datasets import load_counterfact
from editkit.editors.wise import WISEParams
from editkit.editors.wise_merge import ties_merge
from editkit.hooks import get_module
from editkit.types import EditRequest
from tests.helpers import snapshot, target_logprob

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Tiny random models: one context, a few records for the irrelevant row, and margins scaled to
# the activation distances a width-32 model reaches (~0.03 after 10 steps; SmolLM2's are ~40).
FAST = dict(layers=[1], n_iter=10, template_lengths=[], loc_records=8, alpha=0.001, beta=0.01, gamma=0.005,
            edit_lr=10.0)
REQUEST = EditRequest("The Eiffel Tower is located in the city of", "The Eiffel Tower", "Rome", "Paris", case_id="t")
OTHER = EditRequest("Danielle Darrieux speaks the language", "Danielle Darrieux", "English", "French", case_id="o")
PROBE = "The capital of Japan is"


def logits(lm, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(torch.tensor([lm.tokenizer(prompt)["input_ids"]], device=lm.device)).logits


def assert_same_state(lm, original: dict[str, torch.Tensor]) -> None:
    for name, tensor in lm.model.state_dict().items():
        assert torch.equal(tensor, original[name]), f"{name} changed"


def hooks_on(lm, editor) -> int:
    return len(get_module(lm.model, editor.module_path)._forward_hooks)


def test_edit_is_a_hook_seen_by_plain_calls_and_restores_exactly(make_tiny):
    lm = make_tiny("llama")
    original = snapshot(lm)
    before = {p: logits(lm, p) for p in (REQUEST.prompt, PROBE)}
    logp_before = target_logprob(lm, REQUEST.prompt, REQUEST.target_new)
    editor = editkit.get_editor("wise", lm, **FAST)
    handle = editor.edit(REQUEST)
    assert hooks_on(lm, editor) == 1 and editor.memory.n_edits == 1
    assert_same_state(lm, original)  # the side memory is a hook: no weight changes
    assert not torch.equal(logits(lm, REQUEST.prompt), before[REQUEST.prompt])  # a plain call sees it
    assert target_logprob(lm, REQUEST.prompt, REQUEST.target_new) > logp_before + 0.3
    info = handle.info[0]
    assert len(info["losses"]) == FAST["n_iter"] and info["losses"][-1] < info["losses"][0]
    assert info["threshold"] == pytest.approx(0.88 * info["distance"])
    # only masked entries move by gradient (the others only by the 1e-5 weight decay)
    shard, mask = editor.memory.shard, editor.memory.mask
    main = lm.model.get_parameter(f"{editor.module_path}.weight").float()
    assert 0.1 < mask.float().mean() < 0.3
    assert (shard - main)[~mask].abs().max() < 1e-3 * main.abs().max() < (shard - main)[mask].abs().max()
    handle.restore()
    assert hooks_on(lm, editor) == 0 and editor.memory.n_edits == 0 and editor.memory.shard is None
    for prompt, value in before.items():
        assert torch.equal(logits(lm, prompt), value)
    assert_same_state(lm, original)


def test_routing_is_per_row_and_ignores_padding(make_tiny):
    lm = make_tiny("llama")
    editor = editkit.get_editor("wise", lm, **FAST)
    editor.edit(REQUEST)
    tok = lm.tokenizer
    rows = [tok(REQUEST.prompt)["input_ids"], tok(PROBE)["input_ids"]]
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])  # left padding
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        batched = lm.model(input_ids=ids, attention_mask=mask).logits
    for k, row in enumerate(rows):
        assert torch.allclose(batched[k, -1], logits(lm, PROBE if k else REQUEST.prompt)[0, -1], atol=1e-5)
    editor.reset()


def test_threshold_sends_everything_to_main_memory_when_unreachable(make_tiny):
    lm = make_tiny("llama")
    before = logits(lm, REQUEST.prompt)
    editor = editkit.get_editor("wise", lm, **{**FAST, "act_ratio": 1e6})
    handle = editor.edit(REQUEST)
    assert torch.equal(logits(lm, REQUEST.prompt), before)  # no row reaches the threshold: W itself
    handle.restore()


def test_undo_of_the_last_edit_returns_to_the_state_after_the_first(make_tiny):
    lm = make_tiny("llama")
    editor = editkit.get_editor("wise", lm, **FAST)
    first = editor.edit(REQUEST)
    after_first = logits(lm, PROBE), editor.state_dict()
    second = editor.edit(OTHER)
    assert not torch.equal(logits(lm, PROBE), after_first[0])
    second.restore()
    assert torch.equal(logits(lm, PROBE), after_first[0])
    state = editor.state_dict()["memory"]
    assert torch.equal(state["shard"], after_first[1]["memory"]["shard"]) and state["n_edits"] == 1
    first.restore()
    assert hooks_on(lm, editor) == 0


@pytest.mark.parametrize("retrieve", [True, False])
def test_saved_state_resumes_identically(make_tiny, retrieve):
    lm = make_tiny("llama")
    requests = load_counterfact("edit", 3)
    options = {**FAST, "retrieve": retrieve, "save_freq": 1, "merge_freq": 2, "template_lengths": [2]}
    editor = editkit.get_editor("wise", lm, **options)
    editor.edit(requests[:2])
    saved, mid = editor.state_dict(), logits(lm, PROBE)
    editor.edit(requests[2])
    end, final = logits(lm, PROBE), editor.state_dict()
    editor.reset()
    resumed = editkit.get_editor("wise", lm, **options)
    resumed.load_state_dict(saved)
    assert torch.equal(logits(lm, PROBE), mid)
    resumed.edit(requests[2])
    assert torch.equal(logits(lm, PROBE), end)
    again = resumed.state_dict()
    assert again["templates"] == final["templates"] and again["memory"]["n_edits"] == 3
    for name in ("shard", "mask", "merged"):
        a, b = again["memory"][name], final["memory"][name]
        assert (a is None and b is None) or torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(again["memory"]["memories"], final["memory"]["memories"]))
    resumed.load_state_dict({})
    assert hooks_on(lm, resumed) == 0


@pytest.mark.parametrize("retrieve", [True, False])
def test_merged_side_memory_keeps_earlier_edits(make_tiny, retrieve):
    lm = make_tiny("llama")
    editor = editkit.get_editor("wise", lm, **FAST, retrieve=retrieve, save_freq=1, merge_freq=2)
    before = target_logprob(lm, REQUEST.prompt, REQUEST.target_new)
    editor.edit(REQUEST)
    alone = target_logprob(lm, REQUEST.prompt, REQUEST.target_new)
    handle = editor.edit(OTHER)
    mem = editor.memory
    assert handle.info[0]["n_merges"] == 1 and mem.shard is None
    if retrieve:
        assert len(mem.memories) == len(mem.memory_acts) == 1 and mem.merged is None
    else:
        assert mem.memories == [] and mem.merged is not None
    merged = target_logprob(lm, REQUEST.prompt, REQUEST.target_new)
    assert merged > before + 0.5 * (alone - before) > before


def test_ties_merge_by_hand():
    base = torch.zeros(2, 3)
    a = torch.tensor([[1.5, -2.0, 0.1], [0.0, 3.0, -1.0]])
    b = torch.tensor([[1.0, 2.0, 0.0], [4.0, -1.0, -3.0]])
    # density 1: entry-wise sign election, then the mean of the agreeing deltas (weights 0.5 each)
    expected = torch.tensor([[1.25, 2.0, 0.1], [4.0, 3.0, -2.0]])
    assert torch.allclose(ties_merge(base, [a, b], [0.5, 0.5], 1.0), expected)
    # density 0.5 keeps the 3 largest magnitudes of each delta: a -> 1.5, -2, 3; b -> 2, 4, -3
    expected = torch.tensor([[1.5, 2.0, 0.0], [4.0, 3.0, -3.0]])
    assert torch.allclose(ties_merge(base, [a, b], [0.5, 0.5], 0.5), expected)
    assert torch.allclose(ties_merge(base + 1, [a + 1], [1.0], 1.0), a + 1)


@pytest.mark.parametrize("overrides, message", [
    (dict(layers=(1, 2)), "exactly one layer"),
    (dict(merge_freq=3, save_freq=2), "multiple of save_freq"),
    (dict(mask_ratio=0.0), "mask_ratio"),
    (dict(densities=1.5), "densities"),
    (dict(replay=True), "replay"),
    (dict(n_iter=0), "n_iter"),
])
def test_params_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        WISEParams(**overrides)


def test_published_defaults_and_layer_range(make_tiny):
    p = WISEParams()
    assert (p.layers, p.role, p.n_iter, p.edit_lr, p.act_ratio, p.mask_ratio) == ((27,), "mlp_out", 70, 1.0, 0.88, 0.2)
    assert (p.alpha, p.beta, p.gamma, p.save_freq, p.merge_freq, p.densities) == (5.0, 20.0, 10.0, 500, 1000, 0.53)
    with pytest.raises(ValueError, match="out of range"):
        editkit.get_editor("wise", make_tiny("llama"), layers=[7])


@pytest.mark.slow
def test_smollm2_target_rises_and_unrelated_prompt_uses_main_memory(smollm2):
    lm = smollm2
    request = load_counterfact("edit", 1)[0]
    original, unrelated = snapshot(lm), request.locality_prompts[0]
    before, far = target_logprob(lm, request.prompt, request.target_new), logits(lm, unrelated)
    editor = editkit.get_editor("wise", lm, n_iter=12, template_lengths=[], loc_records=4)
    assert editor.layer == 25
    handle = editor.edit(request)
    assert target_logprob(lm, request.prompt, request.target_new) > before + 1.0
    assert torch.allclose(logits(lm, unrelated), far, atol=1e-6, rtol=0)
    handle.restore()
    assert_same_state(lm, original)
    assert torch.equal(logits(lm, unrelated), far)


def test_blocks_below_the_side_memory_run_once_with_the_same_result(make_tiny, monkeypatch):
    """Training runs the blocks below the edited one once, not at each of the n_iter steps, bit for bit."""
    import editkit.editors.wise_batch as wise_batch
    from editkit.prefix_cache import SplitUnsupported

    lm = make_tiny("llama")
    options = {**FAST, "template_lengths": [3]}  # rows of different lengths: padding is exercised

    def train() -> tuple[torch.Tensor, tuple, int]:
        calls = []
        editor = editkit.get_editor("wise", lm, **options)
        editor.context_templates()  # generated first: only the training's calls are counted
        # a module inside block 0 (the block's own hooks still fire when its recorded output is returned)
        hook = get_module(lm.model, lm.adapter.path("mlp_out", 0)).register_forward_hook(lambda *a: calls.append(1))
        try:
            info = editor.edit(REQUEST).info[0]
        finally:
            hook.remove()
        shard = editor.memory.shard.clone()
        editor.reset()
        return shard, info["losses"], len(calls)

    skipped = train()

    def unsupported(*args, **kwargs):
        raise SplitUnsupported("the full batch, for comparison")

    monkeypatch.setattr(wise_batch, "PrefixCachedBatch", unsupported)
    full = train()
    assert torch.equal(skipped[0], full[0]) and skipped[1] == full[1]
    # the full batch: every step, plus the two passes of the first edit's gathered-logits check
    assert full[2] == FAST["n_iter"] + 2 and skipped[2] == 1


@pytest.mark.parametrize("model_type, gathered", [("llama", True), ("gpt2", True), ("gemma3_text", True),
                                                ("gemma2", False)])
def test_only_the_target_positions_are_unembedded_where_that_gives_the_same_logits(make_tiny, model_type, gathered):
    """The loss's logits from the target hidden states alone equal the model's own; where they cannot
    (Gemma 2 soft-caps its logits after the output embedding) the full logits are used."""
    from editkit.editors.wise_batch import gathered_logits_match, target_logits

    lm = make_tiny(model_type)
    if model_type == "gemma2":  # a cap small enough to bend a tiny random model's logits
        lm.model.config.final_logit_softcapping = 0.05
    editor = editkit.get_editor("wise", lm, **FAST)
    batch = editor._batch(REQUEST)
    assert gathered_logits_match(lm, batch) is gathered
    full = target_logits(lm, batch, gathered=False)
    assert full.shape == (len(batch.targets), lm.model.config.vocab_size)
    if gathered:
        assert torch.allclose(target_logits(lm, batch, gathered=True), full, atol=1e-5)
    else:
        assert not torch.allclose(target_logits(lm, batch, gathered=True), full, atol=1e-3)

"""Forward routing: a plain ``lm.model(ids)`` call sees SERAC's and IKE's edits as the engine does."""

from __future__ import annotations

import pytest
import torch

import editkit
from editkit.benchmarks import Engine
from editkit.datasets import load_counterfact
from editkit.editors.trainer import train_editor
from editkit.routing import RoutingError, unrouted
from editkit.tokens import target_text

SERAC = {"encoder": "all-minilm-l6-v2", "steps": 4, "batch_size": 4, "train_records": 16, "val_records": 4,
         "checkpoint_every": 2}
IKE = {"k": 4, "train_records": 64, "min_similarity": 0.5}
UNRELATED = "The capital of Japan is"

pytestmark = pytest.mark.usefixtures("session_cache", "one_torch_thread")


@pytest.fixture(scope="module")
def request_():
    return load_counterfact("edit", 2)[1]


def build(name: str, lm):
    if name == "serac":
        train_editor("serac", lm, progress=False, **SERAC)
        return editkit.get_editor("serac", lm, **SERAC)
    return editkit.get_editor("ike", lm, **IKE)


def forward(lm, texts: list[str], side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a plain padded forward call, and its attention mask."""
    lm.tokenizer.padding_side = side
    try:
        batch = lm.tokenizer(texts, return_tensors="pt", padding=True)
    finally:
        lm.tokenizer.padding_side = "right"
    with torch.no_grad():
        return lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, \
            batch["attention_mask"]


def last_logprob(logits: torch.Tensor, mask: torch.Tensor, row: int, token: int) -> float:
    last = int(mask[row].nonzero().max())
    return logits[row, last].float().log_softmax(-1)[token].item()


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("name", ["serac", "ike"])
def test_plain_forward_sees_the_edit_as_the_engine_does(make_tiny, request_, name, model_type):
    lm = make_tiny(model_type)
    prompt, target = request_.prompt, target_text(request_.target_new)
    ids = torch.tensor([lm.tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        before = lm.model(ids).logits
        unrelated_before = lm.model(torch.tensor([lm.tokenizer(UNRELATED)["input_ids"]])).logits
    handle = build(name, lm).edit(request_)
    score = Engine(lm, batch_size=1, progress=False).score([(prompt, target)])[0]
    token = score.target_tokens[0]
    with torch.no_grad():
        after = lm.model(ids)
        unrelated_after = lm.model(torch.tensor([lm.tokenizer(UNRELATED)["input_ids"]])).logits
    assert after.logits.shape == before.shape and after.cache is None
    routed = after.logits[0, -1].log_softmax(-1)[token].item()
    assert routed == pytest.approx(score.token_logprobs[0], abs=1e-4)
    assert abs(routed - before[0, -1].log_softmax(-1)[token].item()) > 1e-3, "the forward must see the edit"
    assert torch.equal(unrelated_after, unrelated_before), "an out-of-scope input sees the base model"
    with unrouted(lm), torch.no_grad():
        assert torch.equal(lm.model(ids).logits, before)
    handle.restore()
    assert lm.forward_routing is None and not lm.model._forward_hooks
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, before), "restore gives back the unedited outputs bit-exactly"


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", ["serac", "ike"])
def test_padded_batches_route_only_their_edited_rows(make_tiny, request_, name, side):
    lm = make_tiny("llama")
    texts = [UNRELATED, request_.prompt, request_.rephrase_prompts[0]]
    before, mask = forward(lm, texts, side)
    editor = build(name, lm)
    handle = editor.edit(request_)
    after, _ = forward(lm, texts, side)
    engine = Engine(lm, batch_size=1, progress=False)
    scores = engine.score([(text, target_text(request_.target_new)) for text in texts])
    routed = [new != text for new, text in zip(editor.route(texts), texts)]
    assert routed[:2] == [False, True], routed  # the rephrase may or may not be in a briefly trained scope
    for row, is_routed in enumerate(routed):
        if not is_routed:
            assert torch.equal(after[row], before[row]), "an unrouted row is the unedited batch's row, bit for bit"
            continue
        token = scores[row].target_tokens[0]
        assert last_logprob(after, mask, row, token) == pytest.approx(scores[row].token_logprobs[0], abs=1e-4)
        assert (after[row] - before[row]).abs().max() > 1e-3
    handle.restore()


def test_generation_and_losses_name_the_engine(make_tiny, request_):
    lm = make_tiny("llama")
    editor = build("ike", lm)
    editor.edit(request_)
    ids = torch.tensor([lm.tokenizer(request_.prompt)["input_ids"]])
    with pytest.raises(RoutingError, match=r"Engine\.generate_until"):
        lm.model.generate(ids, max_new_tokens=2, do_sample=False)
    with pytest.raises(RoutingError, match="compute it from the returned logits"):
        lm.model(input_ids=ids, labels=ids)
    with unrouted(lm):
        generated = lm.model.generate(ids, max_new_tokens=2, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 2)
    out = lm.model(torch.tensor([lm.tokenizer(UNRELATED)["input_ids"]]), labels=torch.tensor([[1, 2, 3, 4, 5]]))
    assert torch.isfinite(out.loss), "an out-of-scope input keeps every option"
    editor.reset()

"""The shared target-token NLL: equal to a full-vocabulary cross-entropy, blind to other positions,
and the loss that ROME's v* optimisation, FT, MEND and GRACE actually report."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import editkit
import editkit.editors.ft
import editkit.editors.gradients
import editkit.editors.grace
import editkit.editors.mend
import editkit.locate
from editkit.editors import resolve_params
from editkit.editors.mend import MEND, MENDNet
from editkit.locate import optimize_target_values
from editkit.losses import group_mean, target_nll
from editkit.tokens import encode_pair, target_text
from editkit.types import EditRequest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 50
# Two requests of different lengths, right-padded, as FT and MEND batch them.
REQUESTS = [
    EditRequest("The Eiffel Tower is located in the city of", "The Eiffel Tower", "Rio de Janeiro", case_id="a"),
    EditRequest("Danielle Darrieux's mother tongue is", "Danielle Darrieux", "English", case_id="b"),
]


def padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (batch, positions, vocab) logits, and per position the label (-100 off target) and row mask.

    Row r has a prompt of ``3 + 2r`` tokens, then ``r + 1`` target tokens predicted at the
    prompt's last position onwards, then padding.
    """
    generator = torch.Generator().manual_seed(seed)
    batch, width = 3, 12
    logits = torch.randn(batch, width, VOCAB, generator=generator) * 3
    labels = torch.full((batch, width), -100)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for row in range(batch):
        prompt, n_target = 3 + 2 * row, row + 1
        mask[row, :prompt + n_target - 1] = 1
        labels[row, prompt - 1:prompt - 1 + n_target] = torch.randint(VOCAB, (n_target,), generator=generator)
    return logits, labels, mask


def naive_per_row(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row mean NLL over target positions, from a cross-entropy over every position and the whole vocabulary."""
    token_nll = F.cross_entropy(logits.reshape(-1, VOCAB).double(), labels.reshape(-1), ignore_index=-100,
                                reduction="none").reshape(labels.shape)
    on_target = labels != -100
    return (token_nll * on_target).sum(1) / on_target.sum(1)


def where_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, positions = (labels != -100).nonzero(as_tuple=True)
    return rows, positions, labels[rows, positions]


def test_equals_full_cross_entropy_per_request_and_reduced():
    logits, labels, _ = padded_batch()
    rows, positions, targets = where_targets(labels)
    expected = naive_per_row(logits, labels)
    # locate / MEND / GRACE: one row of logits per target token.
    per_row = target_nll(logits[rows, positions], targets, groups=rows, n_groups=3)
    assert per_row.shape == (3,) and per_row.dtype == torch.float32
    torch.testing.assert_close(per_row.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(per_row.mean().double(), expected.mean(), rtol=1e-6, atol=1e-6)  # ROME, FT
    torch.testing.assert_close(per_row.sum().double(), expected.sum(), rtol=1e-6, atol=1e-6)  # MEND
    # GRACE: one request, a mean over its tokens; lower precision logits are read in float32.
    half = logits[rows, positions][rows == 2].half()
    single = target_nll(half, targets[rows == 2])
    assert single.shape == (1,) and single.dtype == torch.float32
    torch.testing.assert_close(single.double(), expected[2:], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(single, F.cross_entropy(half.float(), targets[rows == 2])[None])


def test_shared_query_rows_as_fts_prompt_last():
    """Several targets scored at one row: the full cross-entropy with that row repeated."""
    logits, labels, _ = padded_batch(1)
    rows, positions, targets = where_targets(labels)
    last_prompt = torch.stack([positions[rows == r].min() for r in range(3)])
    queries = logits[torch.arange(3), last_prompt]  # (3, vocab): one query per request
    expected = torch.stack([
        F.cross_entropy(queries[r].double().expand(int((rows == r).sum()), VOCAB), targets[rows == r])
        for r in range(3)])
    got = target_nll(queries, targets, queries=rows, groups=rows, n_groups=3)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)


def test_positions_outside_the_targets_do_not_matter():
    logits, labels, mask = padded_batch(2)
    rows, positions, targets = where_targets(labels)
    width = logits.shape[1]
    flat = rows * width + positions
    before = target_nll(logits.reshape(-1, VOCAB), targets, queries=flat, groups=rows, n_groups=3)
    noisy = logits.clone()
    off = labels == -100  # prompt positions, padding and the last position
    assert bool((off & (mask == 0)).any()) and bool((off & (mask == 1)).any())
    noisy[off] = torch.randn(int(off.sum()), VOCAB) * 100
    after = target_nll(noisy.reshape(-1, VOCAB), targets, queries=flat, groups=rows, n_groups=3)
    assert torch.equal(before, after)
    # ... and no gradient reaches them.
    leaf = logits.clone().requires_grad_(True)
    target_nll(leaf.reshape(-1, VOCAB), targets, queries=flat, groups=rows, n_groups=3).sum().backward()
    assert not leaf.grad[off].any() and leaf.grad[~off].abs().sum() > 0


def test_group_mean_and_arguments():
    values = torch.tensor([1.0, 2.0, 4.0])
    assert torch.equal(group_mean(values, torch.tensor([0, 0, 2]), 4), torch.tensor([1.5, 0.0, 4.0, 0.0]))
    with pytest.raises(ValueError, match="n_groups"):
        target_nll(torch.zeros(2, VOCAB), torch.tensor([1, 2]), groups=torch.tensor([0, 1]))


# -- the callers report this loss ------------------------------------------------------


class Spy:
    """Wraps :func:`target_nll` where a module imported it, recording each result."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, module: object) -> None:
        self.results: list[torch.Tensor] = []
        monkeypatch.setattr(module, "target_nll", self)

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        result = target_nll(*args, **kwargs)
        self.results.append(result.detach().clone())
        return result


def naive_nll(lm, prompt: str, target: str, prompt_last: bool = False) -> float:
    """Mean NLL of ``target`` after ``prompt`` from the model's logits at every position (one unpadded row)."""
    context, answer = encode_pair(lm.tokenizer, prompt, target_text(target))
    with torch.no_grad():
        logits = lm.model(torch.tensor([context + answer[:-1]])).logits[0].float()
    last = len(context) - 1
    scored = logits[last].expand(len(answer), -1) if prompt_last else logits[last:]
    return float(F.cross_entropy(scored, torch.tensor(answer)))


@pytest.mark.parametrize("objective", ["prompt_last", "target_new"])
def test_ft_loss_is_the_shared_nll(make_tiny, monkeypatch, objective):
    lm = make_tiny("llama")
    spy = Spy(monkeypatch, editkit.editors.ft)
    handle = editkit.get_editor("ft", lm, layers=[1], num_steps=2, lr=1e-2, objective_optimization=objective).edit(
        REQUESTS)
    handle.restore()
    assert len(spy.results) == 2 and all(r.shape == (2,) for r in spy.results)
    assert handle.info[0]["losses"][0] == float(spy.results[0].mean())
    expected = [naive_nll(lm, r.prompt, r.target_new, objective == "prompt_last") for r in REQUESTS]
    torch.testing.assert_close(spy.results[0], torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_target_value_loss_is_the_shared_nll(make_tiny, monkeypatch):
    lm = make_tiny("gpt2")
    spy = Spy(monkeypatch, editkit.locate)
    prefixes = ["", "Hello there. "]
    path = lm.adapter.path("mlp_out", 1)
    result = optimize_target_values(lm, REQUESTS[0], [path], prefixes, v_lr=0.1, v_num_grad_steps=1,
                                    v_weight_decay=0.0, clamp_norm_factor=4.0, kl_factor=0.0)[path]
    assert len(spy.results) == 1 and spy.results[0].shape == (2,)
    assert result.losses[0] == float(spy.results[0].mean())  # no KL, no decay: the loss is the NLL
    expected = [naive_nll(lm, p + REQUESTS[0].prompt, REQUESTS[0].target_new) for p in prefixes]
    torch.testing.assert_close(spy.results[0], torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_mend_loss_is_the_shared_nll(make_tiny, monkeypatch):
    lm = make_tiny("gpt2")
    spy = Spy(monkeypatch, editkit.editors.gradients)  # MEND's edit reads u and δ through the shared pass
    params = resolve_params("mend", lm, rank=8, edit_lr=1e-2)
    handle = MEND(lm, params, net=MENDNet.for_model(lm, params)).edit(REQUESTS)
    handle.restore()
    edit_loss, per_request = spy.results  # one edit of two requests; then each request's NLL
    assert edit_loss.shape == (1,) and per_request.shape == (2,)
    assert [i["nll_before"] for i in handle.info] == per_request.tolist()
    expected = [naive_nll(lm, r.prompt, r.target_new) for r in REQUESTS]
    torch.testing.assert_close(per_request, torch.tensor(expected), rtol=1e-5, atol=1e-5)
    n_tokens = [len(encode_pair(lm.tokenizer, r.prompt, target_text(r.target_new))[1]) for r in REQUESTS]
    token_mean = sum(n * e for n, e in zip(n_tokens, expected)) / sum(n_tokens)
    torch.testing.assert_close(edit_loss, torch.tensor([token_mean]), rtol=1e-5, atol=1e-5)


def test_grace_loss_is_the_shared_nll(make_tiny, monkeypatch):
    lm = make_tiny("gpt2")
    spy = Spy(monkeypatch, editkit.editors.grace)
    editor = editkit.get_editor("grace", lm, layers=[1], role="mlp_in", eps=1.0, n_iter=3)
    handle = editor.edit(REQUESTS[0])
    handle.restore()
    assert len(spy.results) == 3 and all(r.shape == (1,) for r in spy.results)
    assert handle.info[0]["losses"] == tuple(float(r[0]) for r in spy.results)
    # Stopping before the first step leaves the initial value in the codebook: the loss is
    # then the NLL that the model with the adaptor gives in one full forward pass.
    spy.results.clear()
    editor = editkit.get_editor("grace", lm, layers=[1], role="mlp_in", eps=1.0, n_iter=3, early_stop_loss=1e9)
    handle = editor.edit(REQUESTS[0])
    expected = naive_nll(lm, REQUESTS[0].prompt, REQUESTS[0].target_new)
    handle.restore()
    assert len(spy.results) == 1
    torch.testing.assert_close(spy.results[0], torch.tensor([expected]), rtol=1e-5, atol=1e-5)
    assert expected != pytest.approx(naive_nll(lm, REQUESTS[0].prompt, REQUESTS[0].target_new), rel=1e-3)

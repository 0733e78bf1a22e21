"""Target optimisation on a cached prefix is the same optimisation as on the full batch.

``optimize_target_values`` runs the positions before the subject's last token once
(:class:`editkit.prefix_cache.PrefixCachedBatch`) and, with ``split_prefix=False``,
the full batch at every step as before. On tiny models in float64 the two agree to
rounding (1e-9), which separates an exact split from one that is merely close; on
SmolLM2 in float32 the editors' updates agree within 1e-5 relative.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import pytest
import torch
import transformers

import editkit
import editkit.locate
from editkit.hooks import forward_hooks, forward_pre_hooks
from editkit.locate import optimize_target_values
from editkit.prefix_cache import PrefixCachedBatch, SplitUnsupported
from editkit.types import EditRequest

from .conftest import TINY_CONFIGS

REQUEST = EditRequest(prompt="The mother tongue of Danielle Darrieux is", subject="Danielle Darrieux",
                      target_new="English", target_true="French")
PREFIXES = ["", "The weather is nice today. ", "Hello. ", "In 1998, a new study of the brain found that. "]
OPTIONS = dict(v_lr=0.5, v_num_grad_steps=6, v_weight_decay=0.5, clamp_norm_factor=4.0, kl_factor=0.0625)


def both_paths(lm, paths, caplog, **options):
    """(full, split) results; fails if the split path fell back to the full batch."""
    full = optimize_target_values(lm, REQUEST, paths, PREFIXES, split_prefix=False, **{**OPTIONS, **options})
    with caplog.at_level(logging.DEBUG, logger="editkit"):
        caplog.clear()
        split = optimize_target_values(lm, REQUEST, paths, PREFIXES, **{**OPTIONS, **options})
    assert "full batch" not in caplog.text
    return full, split


def assert_same(full, split, rtol):
    for path in full:
        a, b = full[path], split[path]
        assert len(a.losses) == len(b.losses) > 1
        torch.testing.assert_close(torch.tensor(b.losses), torch.tensor(a.losses), rtol=rtol, atol=0)
        torch.testing.assert_close(b.initial, a.initial, rtol=rtol, atol=rtol)
        change = (a.value - a.initial).norm()
        assert change > 0
        assert float((b.value - a.value).norm() / change) < rtol


def tiny64(make_tiny, model_type):
    lm = make_tiny(model_type)
    lm.model.to(torch.float64)
    return lm


# Gemma 2 (eager attention only) takes its softmax in float32, where float64's mask value is
# -inf: fully masked left-padding rows turn to NaN in float64, the split refuses the
# non-finite prefix and falls back. It is compared in float32, at the 1e-5.
FLOAT32_ONLY = {"gemma2": 1e-5}


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("roles", [("mlp",), ("blocks",), ("attn_out", "mlp")], ids=["rome", "memit", "pmet"])
def test_split_matches_full_batch_on_every_adapter_row(make_tiny, caplog, model_type, roles):
    lm = make_tiny(model_type) if model_type in FLOAT32_ONLY else tiny64(make_tiny, model_type)
    paths = [lm.adapter.path(role, 1) for role in roles]
    full, split = both_paths(lm, paths, caplog)
    assert_same(full, split, rtol=FLOAT32_ONLY.get(model_type, 1e-9))


def test_split_matches_full_batch_with_adaptive_nll_and_layer_zero(make_tiny, caplog):
    lm = tiny64(make_tiny, "llama")
    paths = [lm.adapter.path("attn_out", 0), lm.adapter.path("mlp", 0)]  # nothing below to skip
    full, split = both_paths(lm, paths, caplog, adaptive_nll=True, v_lr=0.05)
    assert_same(full, split, rtol=1e-9)


def gemma3(make_tiny, window):
    """A tiny Gemma 3 whose every layer attends within a sliding window of ``window`` tokens."""
    tiny = make_tiny("gemma3_text")
    config = copy.deepcopy(tiny.model.config)
    config.sliding_window, config.layer_types = window, ["sliding_attention"] * config.num_hidden_layers
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval().to(torch.float64)
    model.requires_grad_(False)
    return dataclasses.replace(tiny, model=model, name=f"tiny-gemma3-window-{window}")


def test_sliding_window_is_split_exactly(make_tiny, caplog):
    # The longest prefix has 24 tokens and the longest row 26: with a window of 25 the
    # suffix attends across the window's edge, and the result depends on the window.
    path = "model.layers.1.mlp"
    full, split = both_paths(gemma3(make_tiny, 25), [path], caplog)
    assert_same(full, split, rtol=1e-9)
    unwindowed = optimize_target_values(gemma3(make_tiny, 200), REQUEST, [path], PREFIXES, split_prefix=False,
                                        **OPTIONS)[path]
    assert float((unwindowed.value - full[path].value).norm() / (full[path].value - full[path].initial).norm()) > 0.01


def test_prefix_longer_than_the_window_falls_back_with_a_log_line(make_tiny, caplog):
    lm = gemma3(make_tiny, 8)
    path = "model.layers.1.mlp"
    full = optimize_target_values(lm, REQUEST, [path], PREFIXES, split_prefix=False, **OPTIONS)
    with caplog.at_level(logging.DEBUG, logger="editkit"):
        fallback = optimize_target_values(lm, REQUEST, [path], PREFIXES, **OPTIONS)
    assert "runs the full batch at every step: cache layer keeps 7 of 24 prefix slots" in caplog.text
    assert fallback[path].losses == full[path].losses
    assert torch.equal(fallback[path].value, full[path].value)


def test_block_skip_is_dropped_when_blocks_are_not_chained(make_tiny, caplog):
    lm = tiny64(make_tiny, "llama")
    ids = [[5, 6, 7, 8, 9], [10, 11, 12]]
    batch = PrefixCachedBatch(lm.model, ids, [2, 1], pad_id=0, blocks="model.layers", first_block=2)
    reference = batch(torch.tensor([0, 1, 2]))
    # A hook that replaces block 2's input breaks "block 2's input is block 1's output".
    clone_input = ("model.layers.2", lambda module, args: (args[0].clone(), *args[1:]))
    with forward_pre_hooks(lm.model, [clone_input]):
        unchained = PrefixCachedBatch(lm.model, ids, [2, 1], pad_id=0, blocks="model.layers", first_block=2)
        with caplog.at_level(logging.DEBUG, logger="editkit"):
            first = unchained(torch.tensor([0, 1, 2]))
    assert unchained.first_block == 0 and "running every block at every step" in caplog.text
    torch.testing.assert_close(first, reference, rtol=1e-12, atol=1e-12)
    # The chained batch skips blocks 0 and 1 from its second call on, with the same logits.
    assert batch.first_block == 2
    outputs = []
    with forward_hooks(lm.model, [("model.layers.0", lambda module, args, output: outputs.append(output))]):
        torch.testing.assert_close(batch(torch.tensor([0, 1, 2])), reference, rtol=1e-12, atol=1e-12)
    assert len(outputs) == 1 and outputs[0] is batch._below  # block 0 returned the recording, hooks still ran
    assert not any("forward" in vars(block) for block in lm.model.model.layers)


def test_split_logits_equal_the_full_forward(make_tiny):
    lm = tiny64(make_tiny, "gpt2")  # learned absolute positions
    ids = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    batch = PrefixCachedBatch(lm.model, ids, [4, 1], pad_id=0)
    split = batch()
    for row, seq in enumerate(ids):
        full = lm.model(input_ids=torch.tensor([seq])).logits[0]
        start = batch.suffix_index(row, [4, 1][row])
        n = len(seq) - [4, 1][row]
        torch.testing.assert_close(split[row, start:start + n], full[-n:], rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="in the cached prefix"):
        batch.suffix_index(0, 3)
    with pytest.raises(ValueError, match="at least one token"):
        PrefixCachedBatch(lm.model, ids, [6, 1], pad_id=0)


def test_models_without_a_cache_argument_are_refused():
    class NoCache(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return input_ids

    with pytest.raises(SplitUnsupported, match="no cache"):
        PrefixCachedBatch(NoCache(), [[1, 2]], [1], pad_id=0)


def weight_change(editor, request):
    """The updates the editor computes for each parameter (before rounding into the weights)."""
    updates = {}
    real = editor._update_weight

    def spy(handle, path, delta):
        updates[path] = delta.detach().double()
        real(handle, path, delta)

    editor._update_weight = spy
    try:
        editor.edit(request).restore()
    finally:
        del editor._update_weight
    return updates


def refuse(*args, **kwargs):
    raise SplitUnsupported("refused by the test")


@pytest.mark.slow
@pytest.mark.parametrize("method, overrides", [("rome", {"v_num_grad_steps": 3}),
                                               ("memit", {"mom2_n_samples": 16, "v_num_grad_steps": 3})])
def test_smollm2_updates_equal_the_full_batch_updates(smollm2, session_cache, monkeypatch, method, overrides):
    """The packaged settings (21 context templates, ROME layer 4, MEMIT layers 2-6), with 3 of the
    20 optimisation steps: every step runs the same cached or full batch."""
    editor = editkit.get_editor(method, smollm2, **overrides)
    split = weight_change(editor, REQUEST)
    monkeypatch.setattr(editkit.locate, "PrefixCachedBatch", refuse)
    full = weight_change(editor, REQUEST)
    assert set(split) == set(full) and full
    for name in full:
        relative = float((split[name] - full[name]).norm() / full[name].norm())
        assert relative < 1e-5, (name, relative)

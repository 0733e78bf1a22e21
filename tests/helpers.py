"""Small helpers shared by the editor and run tests."""

from __future__ import annotations

import torch

from editkit.benchmarks import Engine
from editkit.locate import module_io_at_subject
from editkit.tokens import target_text


def target_logprob(lm, prompt: str, target: str) -> float:
    """Teacher-forced log P(target | prompt) through the evaluation engine.

    The engine is what every evaluation uses, so memory-based editors that route
    contexts (SERAC) are seen as well as weight and hook editors.
    """
    return Engine(lm, batch_size=1, progress=False).loglikelihood([(prompt, target_text(target))])[0][0]


def snapshot(lm) -> dict[str, torch.Tensor]:
    """A detached copy of the model's whole state dict."""
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def count_checkpoints(monkeypatch) -> list[int]:
    """Record the number of edits of every checkpoint measured from now on (in order)."""
    from editkit import protocol

    calls: list[int] = []
    original = protocol.CheckpointProtocol.measure

    def wrapped(self, engine, requests, *args, **kwargs):
        calls.append(len(requests))
        return original(self, engine, requests, *args, **kwargs)

    monkeypatch.setattr(protocol.CheckpointProtocol, "measure", wrapped)
    return calls


def weight_out_in(lm, editor, layer: int) -> torch.Tensor:
    """A float64 copy of the weight ``editor`` edits at ``layer``, in ``out x in`` orientation."""
    return lm.adapter.as_out_in(lm.model.get_parameter(editor.weight_path_at(layer))).detach().double().clone()


def edit_one_layer(lm, editor, requests, layer: int = 1):
    """Edit ``requests`` with a one-layer MEMIT-family editor; returns (keys, residuals, delta, handle).

    ``keys`` (n x d_in) are read before the edit, ``residuals`` (n x d_out) are each
    request's target minus the layer's output before the edit, and ``delta`` is the
    written update (out x in), all float64. The caller restores ``handle``.
    """
    keys = editor.mean_keys(requests, layer).double()
    current = torch.stack([module_io_at_subject(lm, editor.residual_path(), r.prompt, r.subject)[1]
                           for r in requests]).double()
    before = weight_out_in(lm, editor, layer)
    handle = editor.edit(requests)
    delta = weight_out_in(lm, editor, layer) - before
    residuals = torch.stack([info["target"] for info in handle.info]).double() - current
    return keys, residuals, delta, handle


def resume_against_straight(build, earlier, later):
    """Apply ``earlier`` then ``later`` in one session, and ``later`` in a second session resumed
    from the first one's saved weights and editor state after ``earlier``.

    ``build()`` makes a fresh editor. Returns the uninterrupted run's edited state (the first
    session is restored), the resumed session (still edited: the caller restores it) and the
    saved weights.
    """
    from editkit.editing import EditSession

    straight = EditSession(build())
    straight.apply(earlier)
    saved, state = straight.edited_state(), straight.editor.state_dict()
    straight.apply(later)
    expected = {path: value.clone() for path, value in straight.edited_state().items()}
    straight.restore()
    resumed = EditSession(build())
    resumed.load_edited_state(saved)
    resumed.editor.load_state_dict(state)
    resumed.apply(later)
    return expected, resumed, saved


def trained_editor(name: str, lm, **settings):
    """Editor ``name`` on ``lm`` with ``settings``, its learned part (SERAC, MEND) trained first if missing."""
    import editkit
    from editkit.editors.trainer import train_editor

    train_editor(name, lm, progress=False, **settings)
    return editkit.get_editor(name, lm, **settings)

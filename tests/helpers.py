"""Small helpers shared by the editor and run tests."""

from __future__ import annotations

import torch

from editkit.benchmarks import Engine
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

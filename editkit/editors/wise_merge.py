"""WISE's state and arithmetic that are independent of the model: the side memory's record,
TIES merging and the routing distance.

TIES (Yadav et al., 2023, arXiv 2306.01708), as EasyEdit's ``GTA('magnitude', 'sum',
normalize=True)`` that WISE's ``merge_alg: ties`` names: each memory's task vector
``δ_i = W_i − W_base`` keeps its ``density`` fraction of largest-magnitude entries (the
rest become 0); the weighted vectors ``w_i δ_i`` elect a sign per entry (the sign of
their sum, + on a tie); each entry is the weighted mean of the vectors that agree with
the elected sign (``Σ w_i δ_i [agree] / Σ w_i [agree]``, a divisor 0 read as 1), and
the result is ``W_base`` plus that mean.

The routing distance of WISE (``euc`` in the reference) compares the module's output
under two value matrices after the model's MLP activation function: per token
``‖act(a·W_side) − act(a·W_main)‖₂``, averaged over a row's tokens (at inference a row
of more than 100 tokens takes its largest token instead).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["SideMemory", "ties_merge", "row_distance"]

_LONG_ROW = 100  # tokens beyond which the inference distance is the row's largest (reference: ``infer``)


def _keep_largest(delta: torch.Tensor, density: float) -> torch.Tensor:
    """``delta`` with all but its ``density`` fraction of largest-magnitude entries set to 0."""
    if density >= 1:
        return delta
    flat = delta.reshape(-1)
    k = int(density * flat.numel())
    if k < 1:
        raise ValueError(f"TIES density {density} keeps no entry of a {tuple(delta.shape)} matrix")
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.topk(flat.abs(), k, largest=True, sorted=False).indices] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).view_as(delta)


def ties_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
               density: float) -> torch.Tensor:
    """TIES merge of ``tensors`` onto ``base`` with per-tensor ``weights`` (see the module docstring)."""
    if len(tensors) != len(weights) or not tensors:
        raise ValueError(f"ties_merge needs one weight per tensor, got {len(tensors)} tensors and {len(weights)}")
    deltas = torch.stack([_keep_largest(t - base, density) for t in tensors])
    scale = torch.tensor(list(weights), dtype=deltas.dtype, device=deltas.device).view(-1, *[1] * base.dim())
    weighted = deltas * scale
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(deltas.dtype)
    agree = (weighted.sign() == elected).to(deltas.dtype)
    divisor = (scale * agree).sum(0)
    divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return base + (weighted * agree).sum(0) / divisor


def row_distance(main: torch.Tensor, side: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor],
                 real: torch.Tensor, infer: bool = False) -> torch.Tensor:
    """Per row of ``(rows, positions, width)`` outputs: the activation distance over its real positions.

    Args:
        main, side: the module's output under the main and the side value matrix.
        act: the model's MLP activation function.
        real: ``(rows, positions)`` bool, the positions that count (not padding).
        infer: a row of more than 100 real positions gives its largest distance (as at inference).

    Returns:
        ``(rows,)`` float32; 0 for a row with no real position.
    """
    per_token = torch.linalg.vector_norm(act(side.float()) - act(main.float()), dim=-1)
    count = real.sum(-1)
    mean = (per_token * real).sum(-1) / count.clamp(min=1)
    if not infer:
        return mean
    largest = per_token.masked_fill(~real, float("-inf")).amax(-1)
    return torch.where(count > _LONG_ROW, largest, mean)


@dataclass
class SideMemory:
    """Everything WISE learns. Tensors are float32 ``out x in`` and replaced, never changed in place."""

    shard: torch.Tensor | None = None  # the shard being written (None: equal to W)
    mask: torch.Tensor | None = None  # its gradient mask (bool)
    shard_edits: int = 0
    act_min: float = math.inf  # smallest recorded edit distance behind the current threshold
    memories: list[torch.Tensor] = field(default_factory=list)  # stored shards / merged memories
    memory_acts: list[float] = field(default_factory=list)  # retrieve: each memory's act_min
    merged: torch.Tensor | None = None  # WISE-Merge's merged side memory
    n_edits: int = 0
    n_merges: int = 0

    _TENSORS = ("shard", "mask", "merged")

    def snapshot(self) -> SideMemory:
        return dataclasses.replace(self, memories=list(self.memories), memory_acts=list(self.memory_acts))

    def state_dict(self) -> dict[str, Any]:
        state = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in self._TENSORS:
            state[name] = None if state[name] is None else state[name].to("cpu", copy=True)
        state["memories"] = [m.to("cpu", copy=True) for m in self.memories]
        state["memory_acts"] = list(self.memory_acts)
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any], device: Any) -> SideMemory:
        values = dict(state)
        for name in cls._TENSORS:
            values[name] = None if values[name] is None else values[name].to(device, copy=True)
        values["memories"] = [m.to(device, torch.float32, copy=True) for m in values["memories"]]
        if values["memory_acts"] and len(values["memory_acts"]) != len(values["memories"]):
            raise ValueError("WISE state: memories and memory_acts differ in length")
        return cls(**values)

"""MEND's hyperparameters and its trained network g (Mitchell et al., 2021, arXiv 2110.11309).

Holds :class:`MENDParams`, :func:`edited_modules` (the projections MEND edits, whose
weight shapes size g) and the network g that maps each token's (u, δ) to (ũ, δ̃): the
low-rank residual layers (:class:`LowRankResidual`, :class:`LowRankMLP`), the running
input statistics (:class:`RunningMoments`), one :class:`GradientTransform` per weight
shape, and :class:`MENDNet`, every trained part (the transforms and the α's) for one model.

The equations, the training objective and the deviations from the reference are in
:mod:`editkit.editors.mend`, which computes u and δ, trains g and applies the edit; it
imports this module (never the reverse) and re-exports its public names.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from ..config import Params
from ..hooks import get_module
from .gradients import projection_path

if TYPE_CHECKING:
    from ..models import LoadedModel

__all__ = ["MENDParams", "MENDNet", "edited_modules"]

_STD_EPS = 1e-7  # added to the running std, as in the reference


@dataclass(frozen=True)
class MENDParams(Params):
    """MEND hyperparameters. Defaults: the published GPT2-XL training file
    (EasyEdit ``hparams/TRAINING/MEND/gpt2-xl.yaml``, same values in eric-mitchell/mend).

    ``layers`` x ``roles`` replace the reference's ``inner_params`` (GPT2-XL: the ``c_fc``
    and ``c_proj`` weights of blocks 45-47). One training iteration is one edit of
    ``batch_size`` requests; ``accumulate_bs`` iterations make an optimiser step, so
    training takes ``ceil(max_iters / accumulate_bs)`` steps.
    """

    layers: tuple[int, ...] = (45, 46, 47)
    roles: tuple[str, ...] = ("mlp_in", "mlp_out")
    # The network g (reference: mlp_class IDMLP, n_hidden 1, init id, act relu, rank 1920,
    # norm, combine, shared).
    rank: int = 1920
    n_hidden: int = 1
    init: Literal["id", "xavier"] = "id"
    act: Literal["relu"] = "relu"
    norm: bool = True
    combine: bool = True
    shared: bool = True
    # The edit step α's initial value (edit_lr 1e-4), learned with Adam at lr_lr 1e-4.
    edit_lr: float = 1e-4
    # Training: Adam lr 1e-6 for g, cedit 0.1, cloc 1.0, grad_clip 100, batch_size 1,
    # accumulate_bs 10, max_iters 100,000, seed 42.
    lr: float = 1e-6
    lr_lr: float = 1e-4
    cedit: float = 0.1
    cloc: float = 1.0
    grad_clip: float = 100.0
    batch_size: int = 1
    accumulate_bs: int = 10
    max_iters: int = 100_000
    edit_loss_on: Literal["prompt", "rephrase", "both"] = "both"
    train_data: str = "counterfact"
    train_records: int = 0
    # Requests edited (one by one) at each checkpoint's validation (reference: val_steps 500).
    val_records: int = 500
    # Reference: validation every 1,000 iterations, i.e. 100 optimiser steps.
    checkpoint_every: int = 100
    seed: int = 42

    def __post_init__(self) -> None:
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"MEND needs one or more distinct layers, got layers={self.layers}")
        if not self.roles or len(set(self.roles)) != len(self.roles):
            raise ValueError(f"MEND needs one or more distinct roles, got roles={self.roles}")
        if self.rank < 1 or self.n_hidden < 0:
            raise ValueError(f"rank must be >= 1 and n_hidden >= 0, got rank={self.rank}, n_hidden={self.n_hidden}")
        if self.init not in ("id", "xavier") or self.act != "relu":
            raise ValueError(f"init must be 'id' or 'xavier' and act 'relu', got {self.init!r}, {self.act!r}")
        if self.edit_loss_on not in ("prompt", "rephrase", "both"):
            raise ValueError(f"edit_loss_on must be 'prompt', 'rephrase' or 'both', got {self.edit_loss_on!r}")
        if self.lr <= 0 or self.lr_lr < 0 or self.grad_clip <= 0:
            raise ValueError("lr and grad_clip must be positive and lr_lr >= 0")
        if self.cedit < 0 or self.cloc < 0 or self.cedit + self.cloc == 0:
            raise ValueError(f"cedit and cloc must be >= 0 and not both 0, got {self.cedit}, {self.cloc}")
        if min(self.batch_size, self.accumulate_bs, self.max_iters, self.checkpoint_every) < 1:
            raise ValueError("batch_size, accumulate_bs, max_iters and checkpoint_every must be >= 1")
        if self.train_records < 0 or self.val_records < 0:
            raise ValueError("train_records and val_records must be >= 0 (0: all)")
        if self.train_data not in ("counterfact", "zsre"):
            raise ValueError(f"train_data must be 'counterfact' or 'zsre', got {self.train_data!r}")


def edited_modules(lm: LoadedModel, params: MENDParams) -> list[str]:
    """Module paths of the edited projections, layer by layer, in ``roles`` order."""
    return [projection_path(lm, layer, role, "MEND") for layer in params.layers for role in params.roles]


def _shapes(lm: LoadedModel, paths: Sequence[str]) -> list[tuple[int, int]]:
    """(in, out) of each module's weight, read through the adapter's orientation."""
    return [tuple(reversed(lm.adapter.as_out_in(get_module(lm.model, p).weight).shape)) for p in paths]


# -- the network g ----------------------------------------------------------------


class LowRankResidual(nn.Module):
    """``h ↦ h + relu(s_m ⊙ (A B h + b) + o_m)`` (``init="id"``), or without the ``h +`` (``"xavier"``)."""

    def __init__(self, width: int, rank: int, n_modes: int | None, init: str, generator: torch.Generator) -> None:
        super().__init__()
        inner = min(rank, width)
        self.residual = init == "id"
        if self.residual:
            self.up = nn.Parameter(torch.zeros(width, inner))
            self.down = nn.Parameter(torch.randn(inner, width, generator=generator))
        else:
            self.up = nn.Parameter(torch.empty(width, inner))
            self.down = nn.Parameter(torch.empty(inner, width))
            bound_up = nn.init.calculate_gain("relu") * math.sqrt(6.0 / (width + inner))
            bound_down = math.sqrt(6.0 / (width + inner))
            with torch.no_grad():
                self.up.uniform_(-bound_up, bound_up, generator=generator)
                self.down.uniform_(-bound_down, bound_down, generator=generator)
        self.bias = nn.Parameter(torch.zeros(width))
        self.mode_scale = nn.Parameter(torch.ones(n_modes, width)) if n_modes else None
        self.mode_shift = nn.Parameter(torch.zeros(n_modes, width)) if n_modes else None

    def forward(self, h: torch.Tensor, mode: int | None) -> torch.Tensor:
        pre = (h @ self.down.T) @ self.up.T + self.bias
        if self.mode_scale is not None and mode is not None:
            pre = pre * self.mode_scale[mode] + self.mode_shift[mode]
        # clamp, not relu: at init A = 0 makes every pre-activation exactly 0, where relu's
        # gradient is 0 and g would never learn; clamp passes the gradient there (as the reference).
        out = pre.clamp(min=0)
        return h + out if self.residual else out


class LowRankMLP(nn.Module):
    def __init__(self, width: int, params: MENDParams, n_modes: int | None, generator: torch.Generator) -> None:
        super().__init__()
        self.layers = nn.ModuleList(LowRankResidual(width, params.rank, n_modes, params.init, generator)
                                    for _ in range(params.n_hidden + 1))

    def forward(self, h: torch.Tensor, mode: int | None) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h, mode)
        return h


class RunningMoments(nn.Module):
    """Per-feature running mean and variance (Chan et al.'s pairwise update), as buffers."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(width, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(width, dtype=torch.float64))

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        n = x.shape[0]
        if n == 0:
            return
        x = x.double()
        batch_mean = x.mean(0)
        total = self.count + n
        shift = batch_mean - self.mean
        self.m2 += ((x - batch_mean) ** 2).sum(0) + shift**2 * (self.count * n / total)
        self.mean += shift * (n / total)
        self.count.copy_(total)

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        if self.count < 2:
            return x
        std = (self.m2 / (self.count - 1)).sqrt()
        return ((x.double() - self.mean) / (std + _STD_EPS)).float()


class GradientTransform(nn.Module):
    """g for weights of one shape ``in -> out``: (u, δ) -> (ũ, δ̃) for ``mode`` (the weight's index)."""

    def __init__(self, x_dim: int, delta_dim: int, params: MENDParams, n_modes: int | None,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.x_dim, self.delta_dim, self.norm = x_dim, delta_dim, params.norm
        self.u_moments, self.delta_moments = RunningMoments(x_dim), RunningMoments(delta_dim)
        if params.combine:
            self.mlp = LowRankMLP(x_dim + delta_dim, params, n_modes, generator)
        else:
            self.u_mlp = LowRankMLP(x_dim, params, n_modes, generator)
            self.delta_mlp = LowRankMLP(delta_dim, params, n_modes, generator)

    def forward(self, u: torch.Tensor, delta: torch.Tensor, mode: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        u, delta = u.float(), delta.float()
        if self.training:
            self.u_moments.observe(u)
            self.delta_moments.observe(delta)
        if self.norm:
            u, delta = self.u_moments.standardise(u), self.delta_moments.standardise(delta)
        if hasattr(self, "mlp"):
            out = self.mlp(torch.cat([u, delta], dim=-1), mode)
            return out[:, :self.x_dim], out[:, self.x_dim:]
        return self.u_mlp(u, mode), self.delta_mlp(delta, mode)


class MENDNet(nn.Module):
    """Every trained part of MEND for one model: the transforms (and their statistics) and the α's.

    Args:
        shapes: ``(in, out)`` of each edited weight, in the order of :func:`edited_modules`.
    """

    def __init__(self, shapes: Sequence[tuple[int, int]], params: MENDParams) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(params.seed)
        self.slots: list[tuple[str, int | None]] = []  # (transform key, mode) of each weight
        keys = [f"{i}x{o}" if params.shared else f"w{n}" for n, (i, o) in enumerate(shapes)]
        self.transforms = nn.ModuleDict()
        for key, (x_dim, delta_dim) in zip(keys, shapes):
            n_modes = keys.count(key) if params.shared else None
            if key not in self.transforms:
                self.transforms[key] = GradientTransform(x_dim, delta_dim, params, n_modes, generator)
            self.slots.append((key, sum(k == key for k, _ in self.slots) if params.shared else None))
        self.edit_lrs = nn.Parameter(torch.full((len(shapes),), float(params.edit_lr)))

    @classmethod
    def for_model(cls, lm: LoadedModel, params: MENDParams) -> MENDNet:
        """An untrained network (g the identity, α = ``edit_lr``) for ``lm``'s edited weights."""
        return cls(_shapes(lm, edited_modules(lm, params)), params)

    def factors(self, index: int, u: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ũ, −α δ̃) for weight ``index`` from token rows of u (T x in) and δ (T x out)."""
        key, mode = self.slots[index]
        u_tilde, delta_tilde = self.transforms[key](u, delta, mode)
        return u_tilde, -self.edit_lrs[index] * delta_tilde

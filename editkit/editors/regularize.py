"""Update regularisers for lifelong editing, shared by every locate-then-edit editor.

RECT (Gu et al., 2024, "Model Editing Harms General Abilities of Large Language
Models: Regularization to the Rescue", arXiv 2401.04700) keeps, of each update
``Δ`` written to a weight ``W``, only the ``k`` fraction of entries with the largest
relative change ``|Δ_ij| / |W_ij|`` and zeroes the rest (the paper's ``k`` is 20%).
Checked against the RECT variant in scalable-model-editing/knowledge-editing-
regularization (``memit/memit_rect_main.py``: relative change against the weight
before the update, with ``1e-8`` added to ``W``). Here exactly ``round(k · numel)``
entries are kept (``topk``), where the reference keeps those at or above a
``kthvalue`` threshold (ties may keep a few more).

PRUNE (Ma et al., 2024, "Perturbation-Restrained Sequential Model Editing",
arXiv 2405.16821) bounds the condition number of the edited matrix by restraining
the accumulated perturbation ``ΔW = W − W0`` (``W0``: the weight before any edit).
With ``ΔW = U diag(σ) Vᵀ`` and ``σ̄ = σ_max(W0)``, every singular value ``σ_i ≥ σ̄``
becomes

    F(σ_i) = log_α(σ_i) − log_α(σ̄) + σ̄

(smaller ones are kept), and ``W = W0 + U diag(F(σ)) Vᵀ``. Checked against the
authors' ``PRUNE.reduce_weights`` / ``func_logn`` (its default ``reduce_name`` is
``"log1_2"``, α = 1.2; the paper tunes α per method and model).
"""

from __future__ import annotations

import math

import torch

__all__ = ["rect_sparsify", "prune_restraint", "restrain_perturbation"]

RECT_EPSILON = 1e-8  # added to |W| in the relative change, as the reference does


def rect_sparsify(delta: torch.Tensor, weight: torch.Tensor, top_k: float) -> torch.Tensor:
    """``delta`` with all but the ``top_k`` fraction of entries of largest ``|Δ| / (|W| + ε)`` zeroed.

    ``delta`` and ``weight`` share a shape (the parameter's stored orientation); the
    result has ``delta``'s dtype and exactly ``round(top_k · numel)`` entries kept.
    """
    if not 0 < top_k <= 1:
        raise ValueError(f"rect_top_k must be in (0, 1], got {top_k}")
    if delta.shape != weight.shape:
        raise ValueError(f"RECT needs the update and the weight in one shape, got {delta.shape} and {weight.shape}")
    keep = round(top_k * delta.numel())
    relative = delta.abs().double() / (weight.detach().to(delta.device).abs().double() + RECT_EPSILON)
    mask = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
    mask[torch.topk(relative.flatten(), keep).indices] = True
    return delta * mask.view(delta.shape)


def prune_restraint(singular_values: torch.Tensor, bound: float, alpha: float) -> torch.Tensor:
    """PRUNE's ``F``: ``log_α(σ) − log_α(bound) + bound`` for ``σ ≥ bound``, ``σ`` itself below."""
    if alpha <= 1:
        raise ValueError(f"prune_alpha must exceed 1, got {alpha}")
    log_alpha = math.log(alpha)
    restrained = (torch.log(singular_values.clamp_min(bound)) - math.log(bound)) / log_alpha + bound
    return torch.where(singular_values >= bound, restrained, singular_values)


def restrain_perturbation(perturbation: torch.Tensor, bound: float, alpha: float) -> torch.Tensor:
    """``U diag(F(σ)) Vᵀ`` for ``perturbation = U diag(σ) Vᵀ`` (float64 SVD, result in float64)."""
    left, values, right = torch.linalg.svd(perturbation.double(), full_matrices=False)
    return (left * prune_restraint(values, bound, alpha)) @ right

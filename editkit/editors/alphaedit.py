"""AlphaEdit: null-space constrained knowledge editing (Fang et al., ICLR 2025, arXiv 2410.02355).

AlphaEdit keeps MEMIT's targets, keys and residual spreading, and changes the solve
at each edit layer:

    C    = E[k kᵀ] over preserved-knowledge text (the key second moment)
    P    = Û Ûᵀ, Û = eigenvectors of C whose eigenvalues are below
           ``nullspace_threshold`` (the null space of the preserved keys)
    Δᵀ   = (P (K Kᵀ + K_p K_pᵀ) + L2·I)⁻¹ P K Rᵀ

where K are the new keys, R the spread residuals and K_p the keys of every earlier
edit made by this editor (re-measured after each edit, as the reference does). The
rows of Δ lie in the range of P, so Δ k = 0 for every key in the retained subspace
(the span of the large-eigenvalue eigenvectors): preserved knowledge is, to first
order, untouched. ``L2`` is a ridge term; ``mom2_update_weight`` is accepted for
published configs but, as in the reference, unused.

The record of earlier keys lives on the editor (:class:`~editkit.editors.memit.KeyRecord`,
shared with ENCORE): an edit's handle removes what the edit added,
:meth:`AlphaEdit.reset` clears it, and it is saved with every run checkpoint
(``state_dict``), so a resumed run continues exactly. It is stored as the keys
themselves (``m x d_in`` per layer, float32) and ``K_p K_pᵀ`` is formed from them in
float64 at each edit.

Checked against jianghoucheng/AlphaEdit (``AlphaEdit/AlphaEdit_main.py``,
``hparams/AlphaEdit/{gpt2-xl,EleutherAI_gpt-j-6B,Llama3-8B}.json``). Deviations:
MEMIT's (statistics corpus, sampled prefixes); the projection uses ``eigh`` of
``C`` in float64 where the reference takes an SVD in float32 (same vectors for a
symmetric positive semi-definite matrix).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .memit import KeyRecord, MEMITParams

if TYPE_CHECKING:
    from ..models import LoadedModel

__all__ = ["AlphaEdit", "AlphaEditParams"]


@dataclass(frozen=True)
class AlphaEditParams(MEMITParams):
    """AlphaEdit hyperparameters; defaults are the reference's GPT2-XL values."""

    mom2_update_weight: float = 20000.0
    nullspace_threshold: float = 2e-2
    L2: float = 10.0  # noqa: N815 (the reference's name)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.mom2_adjustment:
            raise ValueError("AlphaEdit projects with the key statistics: mom2_adjustment must be true")
        if self.nullspace_threshold <= 0 or self.L2 < 0:
            raise ValueError("nullspace_threshold must be positive and L2 non-negative")


class AlphaEdit(KeyRecord):
    """MEMIT whose updates are projected onto the null space of preserved keys."""

    name = "alphaedit"
    params_class = AlphaEditParams
    params: AlphaEditParams

    def __init__(self, lm: LoadedModel, params: AlphaEditParams) -> None:
        super().__init__(lm, params)
        self._projections: dict[int, torch.Tensor] = {}

    def projection(self, layer: int) -> torch.Tensor:
        """``P`` at ``layer`` (float64): projector onto eigenvectors of C below the threshold."""
        if layer not in self._projections:
            eigenvalues, eigenvectors = torch.linalg.eigh(self.second_moment(layer))
            kept = eigenvectors[:, eigenvalues < self.params.nullspace_threshold]
            self._projections[layer] = kept @ kept.T
        return self._projections[layer]

    def solve(self, index: int, layer: int, keys: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
        projection = self.projection(layer)
        earlier = self.earlier_keys(layer)
        identity = torch.eye(projection.shape[0], dtype=torch.float64, device=projection.device)
        system = projection @ (keys.T @ keys + earlier.T @ earlier) + self.params.L2 * identity
        return torch.linalg.solve(system, projection @ keys.T @ residuals).T


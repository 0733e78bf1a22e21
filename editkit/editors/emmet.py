"""EMMET: Equality-constrained Mass Model Editing (Gupta, Sajnani & Anumanchipalli, 2024,
"A Unified Framework for Model Editing", arXiv 2403.14236).

ROME maps one key to its value exactly (an equality constraint) while preserving
``W0 K0``; MEMIT trades the constraint for a least-squares term so that it can write
a batch. EMMET keeps the equality for a whole batch: for keys ``K`` (``d_in x n``,
prefix-averaged at the subject's last token as MEMIT's) and residuals ``R = V − W K``

    Δ = R (Kᵀ C⁻¹ K + ε I)⁻¹ Kᵀ C⁻¹,  C = λ E[k kᵀ] + μ I,  ε = emmet_lambda (only when n > 1)

the minimiser of ``tr(Δ C Δᵀ)`` subject to ``Δ K = R`` (exactly so when ε = 0). For
one request ``Δ = R kᵀ C⁻¹ / (kᵀ C⁻¹ k)``: ROME's rank-one update (r-ROME's, whose
key is the same prefix mean), and then λ cancels. Targets, keys and the spreading
of the residual over ``layers`` are MEMIT's (the reference runs EMMET through the
MEMIT loop; its published files edit one layer).

Checked against scalable-model-editing/unified-model-editing (``emmet/emmet_main.py``:
the solve at lines 219-256; ``emmet/compute_z.py`` is MEMIT's ``compute_z``) and
its ``hparams/EMMET/{gpt2-xl,llama2-7b,EleutherAI_gpt-j-6B}.json``. Defaults are the
GPT2-XL file's. Deviations: MEMIT's (statistics corpus, sampled context prefixes);
linear systems are solved in float64 instead of forming ``C⁻¹`` and ``D⁻¹`` with
``torch.inverse``; a singular ``Kᵀ C⁻¹ K`` falls back to the pseudo-inverse as the
reference does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .memit import MEMIT, MEMITParams

__all__ = ["EMMET", "EMMETParams"]


@dataclass(frozen=True)
class EMMETParams(MEMITParams):
    """EMMET hyperparameters; defaults are the reference's GPT2-XL values (``hparams/EMMET/gpt2-xl.json``)."""

    layers: tuple[int, ...] = (17,)
    mom2_update_weight: float = 1000.0
    update_norm_lambda: float = 0.0  # μ: ridge added to λ C
    emmet_lambda: float = 0.1        # ε: ridge added to Kᵀ C⁻¹ K for batches of two or more

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.update_norm_lambda < 0 or self.emmet_lambda < 0:
            raise ValueError("update_norm_lambda and emmet_lambda must be non-negative")


class EMMET(MEMIT):
    """Batched editing with an equality constraint: Δ K = R for every request of the batch."""

    name = "emmet"
    params_class = EMMETParams
    params: EMMETParams

    def preservation_matrix(self, layer: int) -> torch.Tensor:
        """``C = λ E[k kᵀ] + μ I`` at ``layer`` (float64)."""
        p = self.params
        moment = p.mom2_update_weight * self.second_moment(layer)
        if p.update_norm_lambda:
            moment = moment + p.update_norm_lambda * torch.eye(moment.shape[0], dtype=moment.dtype,
                                                               device=moment.device)
        return moment

    def solve(self, index: int, layer: int, keys: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
        whitened = torch.linalg.solve(self.preservation_matrix(layer), keys.T)   # C⁻¹ K, d_in x n
        gram = keys @ whitened                                                   # Kᵀ C⁻¹ K, n x n
        if gram.shape[0] > 1:
            gram = gram + self.params.emmet_lambda * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        try:
            coefficients = torch.linalg.solve(gram, whitened.T)                  # (Kᵀ C⁻¹ K)⁻¹ Kᵀ C⁻¹
        except torch.linalg.LinAlgError:
            coefficients = torch.linalg.pinv(gram) @ whitened.T
        return residuals.T @ coefficients

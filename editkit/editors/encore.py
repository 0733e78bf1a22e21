"""ENCORE: Early stopping and Norm-Constrained Robust knowledge Editing (Gupta et al., 2025,
"Lifelong Sequential Knowledge Editing without Model Degradation", arXiv 2502.01636).

ENCORE is MEMIT with two regularisers aimed at long sequences of edits:

* most-probable early stopping (MPES) of the target optimisation: it stops at the
  ``|prob_cutoff|``-th step on which the new target is the most probable token at
  every target position of every (prefixed) prompt, instead of driving its
  probability towards one (:func:`editkit.locate.optimize_target_values`);
* a Frobenius-norm constraint on the update, ``μ ‖Δ‖²`` added to MEMIT's objective
  ``‖Δ K − R‖² + λ tr(Δ C Δᵀ)`` (+ ``‖Δ K_p‖²`` over the keys ``K_p`` of earlier edits
  when ``add_prev_edits``), whose minimiser solves the modified normal equation

      Δ (K Kᵀ + K_p K_pᵀ + λ C + μ I) = R Kᵀ,   μ = update_norm_lambda.

Targets, keys and residual spreading are MEMIT's. Checked against
scalable-model-editing/encore (``encore/encore_main.py``: λ C + μ I at lines 257-262,
the earlier edits' ``K Kᵀ`` at 272-280, the solve at 284-291; MPES in
``encore/compute_z.py`` at the ``prob_cutoff`` checks) and its
``hparams/ENCORE/{gpt2-xl,llama2-7b,llama3-8b}.json``. Defaults are the GPT2-XL
file's. Deviations: MEMIT's (statistics corpus, sampled context prefixes); MPES also
checks the bare prompt (the reference skips row 0); the earlier edits' keys are
re-measured after each edit (as AlphaEdit's record), where the reference stores the
keys each layer saw while it was being edited.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .memit import KeyRecord, MEMITParams

__all__ = ["ENCORE", "ENCOREParams"]


@dataclass(frozen=True)
class ENCOREParams(MEMITParams):
    """ENCORE hyperparameters; defaults are the reference's GPT2-XL values (``hparams/ENCORE/gpt2-xl.json``)."""

    mom2_update_weight: float = 20000.0
    update_norm_lambda: float = 10.0  # μ, the norm constraint
    add_prev_edits: bool = True       # keep the earlier edits' keys in the normal equation
    prob_cutoff: float = -4.0         # MPES: stop at the 4th step with the target on top

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.update_norm_lambda < 0:
            raise ValueError(f"update_norm_lambda must be non-negative, got {self.update_norm_lambda}")


class ENCORE(KeyRecord):
    """MEMIT with most-probable early stopping and a Frobenius-norm penalty on the update."""

    name = "encore"
    params_class = ENCOREParams
    params: ENCOREParams

    def solve(self, index: int, layer: int, keys: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
        p = self.params
        moment = self.second_moment(layer)
        identity = torch.eye(moment.shape[0], dtype=moment.dtype, device=moment.device)
        system = p.mom2_update_weight * moment + p.update_norm_lambda * identity + keys.T @ keys
        if p.add_prev_edits:
            earlier = self.earlier_keys(layer)
            system = system + earlier.T @ earlier
        return residuals.T @ torch.linalg.solve(system, keys.T).T

"""PMET: Precise Model Editing in a Transformer (Li et al., AAAI 2024, arXiv 2308.08742).

PMET keeps MEMIT's multi-layer least squares but changes what is optimised and
what is written:

    (a_i*, m_i*) = argmin nll_loss_factor·NLL(target_i) + kl_factor·KL
                   + v_weight_decay·(|δ_a|/|a0|² + |δ_m|/|m0|²)
        over deltas added *together* to the attention output (o_proj) and the MLP
        output (down_proj) of the last edit layer l_L at the subject's last token;
        each delta is clamped to clamp_norm_factor times its initial norm
    R    = [m_i* − m_i] / sqrt(L − j + 1),  m_i = current MLP output at l_L
    Δ_l  = R Kᵀ (K Kᵀ + λ C_l)⁻¹   for the MLP output projections only

Only the FFN target enters the update (the attention target is optimised to
absorb the part of the edit the FFN should not carry), and the residual is divided
by the square root of the number of layers left instead of the number itself.
When the target is already the argmax everywhere, the NLL weight drops to a tenth
and the optimisation stops once the KL term is below 0.01.

Checked against xpq-tech/PMET (``edit/pmet/pmet_main.py``, ``compute_zs.py``,
``hparams/PMET/EleutherAI_gpt-j-6B.json``) and EasyEdit's
``hparams/PMET/llama-7b.yaml``. Defaults are the authors' GPT-J values; other
models are in ``editkit/configs/pmet.yaml``. Deviations are MEMIT's (statistics
corpus, sampled context prefixes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..locate import optimize_target_values
from ..types import EditRequest
from .memit import MEMIT, MEMITParams

__all__ = ["PMET", "PMETParams"]


@dataclass(frozen=True)
class PMETParams(MEMITParams):
    """PMET hyperparameters; defaults are the authors' GPT-J values."""

    layers: tuple[int, ...] = (3, 4, 5, 6, 7, 8)
    v_num_grad_steps: int = 30
    v_lr: float = 0.2
    kl_factor: float = 1.0
    mom2_update_weight: float = 6000.0
    nll_loss_factor: float = 1.0


class PMET(MEMIT):
    """MEMIT with jointly optimised attention and FFN targets; only FFN weights change."""

    name = "pmet"
    params_class = PMETParams
    params: PMETParams

    def residual_path(self) -> str:
        return self.lm.adapter.path("mlp_out", self.z_layer)

    def optimize_targets(self, request: EditRequest) -> tuple[torch.Tensor, tuple[float, ...]]:
        attention = self.lm.adapter.path("attn_out", self.z_layer)
        found = optimize_target_values(
            self.lm, request, [attention, self.residual_path()], self.prefixes,
            nll_loss_factor=self.params.nll_loss_factor, adaptive_nll=True, **self.params.target_options(),
        )
        mlp = found[self.residual_path()]
        return mlp.value, mlp.losses

    def spread(self, index: int) -> float:
        return math.sqrt(len(self.params.layers) - index)

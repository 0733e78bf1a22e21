"""ROME: Rank-One Model Editing (Meng et al., 2022, arXiv 2202.05262).

Equations, for the MLP output projection ``W`` (``out x in``) at layer ``l``:

    k*  = mean over context prefixes x_j of the key (input of W) at the subject's
          last token of x_j + prompt                                  (compute_u)
    u   = C⁻¹ k* / |C⁻¹ k*|, with C = E[k kᵀ] (or C = I when mom2_adjustment is off)
    v*  = argmin over v of  NLL(target | x_j + prompt) + kl_factor·KL + decay,
          v replacing the MLP output at the subject's last token       (compute_v)
    Ŵ   = W + r uᵀ,  r = (v* − W k) / (kᵀ u)

where ``k`` in the last line is the key of the bare prompt. Then ``Ŵ k = v*``
exactly and the update is rank one.

Checked against kmeng01/rome (``rome/compute_u.py``, ``compute_v.py``,
``rome_main.py``) and its ``hparams/ROME/gpt2-xl.json``. Known deviations:

* The denominator uses the bare-prompt key while ``u`` comes from the prefix mean,
  exactly as the reference code does; r-ROME (Gupta et al., 2024) showed this
  asymmetry makes sequential ROME collapse and fixes it by using one key for both.
  That variant is a separate editor.
* Generated context prefixes drop special tokens (the reference keeps GPT-2's
  ``<|endoftext|>``), so chat markers do not leak into prompts of chat models.
* The reference computes ``C⁻¹`` with ``torch.inverse`` in float32; here the
  system ``C x = k*`` is solved in float64.

Defaults are the reference's GPT2-XL values except ``mom2_adjustment=False``:
that is the setting of the study this package reproduces (Li et al., 2024, who
ran ROME with ``C = I`` on every model). Per-model layers live in
``editkit/configs/rome.yaml``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..config import Params
from ..editing import EditHandle, Editor
from ..locate import context_templates, module_io_at_subject, optimize_target_value, subject_keys
from ..stats import second_moment
from ..types import EditRequest

__all__ = ["ROME", "ROMEParams"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ROMEParams(Params):
    """ROME hyperparameters (names as in the reference's hparams files)."""

    layers: tuple[int, ...] = (17,)
    fact_token: str = "subject_last"
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    # Accepted for compatibility with published configs: like the reference, the
    # loss is always computed on the final logits.
    v_loss_layer: int | None = None
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    mom2_adjustment: bool = False
    mom2_dataset: str = "model_samples"
    mom2_n_samples: int = 100000
    mom2_dtype: str = "float64"
    context_template_length_params: tuple[tuple[int, ...], ...] = ((5, 10), (10, 10))
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.layers) != 1:
            raise ValueError(f"ROME edits exactly one layer, got layers={self.layers}")
        if self.fact_token != "subject_last":
            raise ValueError(f"only fact_token='subject_last' is implemented, got {self.fact_token!r}")
        if self.v_num_grad_steps < 1 or self.v_lr <= 0 or self.clamp_norm_factor <= 0:
            raise ValueError("v_num_grad_steps, v_lr and clamp_norm_factor must be positive")


class ROME(Editor):
    """Rank-one edit of one MLP output projection per request (applied one by one)."""

    name = "rome"
    params_class = ROMEParams

    def __init__(self, lm: Any, params: ROMEParams) -> None:
        super().__init__(lm, params)
        self.layer = params.layers[0]
        if not 0 <= self.layer < lm.n_layers:
            raise ValueError(f"ROME layer {self.layer} is out of range for {lm.name} ({lm.n_layers} layers)")
        self.weight_path = lm.adapter.weight_path("mlp_out", self.layer)
        self._prefixes: list[str] | None = None
        self._inverse_key_transform: torch.Tensor | None = None  # C (float64), loaded lazily

    # -- cached state ---------------------------------------------------------
    @property
    def prefixes(self) -> list[str]:
        """Context prefixes, sampled once per editor with the editor's seed."""
        if self._prefixes is None:
            self._prefixes = context_templates(self.lm, self.params.context_template_length_params, self.params.seed)
        return self._prefixes

    def _whiten(self, key: torch.Tensor) -> torch.Tensor:
        if not self.params.mom2_adjustment:
            return key
        if self._inverse_key_transform is None:
            self._inverse_key_transform = second_moment(
                self.lm, self.lm.adapter.path("mlp_out", self.layer), self.params.mom2_dataset,
                self.params.mom2_n_samples, self.params.mom2_dtype, seed=self.params.seed,
            )
        cov = self._inverse_key_transform.to(key.device)
        return torch.linalg.solve(cov, key.to(cov.dtype)).to(key.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"prefixes": list(self.prefixes)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "prefixes" in state:
            self._prefixes = list(state["prefixes"])

    # -- the edit -------------------------------------------------------------
    def _apply(self, requests: list[EditRequest], handle: EditHandle) -> None:
        for request in requests:  # ROME is sequential by construction
            handle.info.append(self._apply_one(request, handle))

    def _apply_one(self, request: EditRequest, handle: EditHandle) -> dict[str, Any]:
        lm, p = self.lm, self.params
        module_path = lm.adapter.path("mlp_out", self.layer)
        # u: whitened mean key over the context prefixes, unit norm.
        mean_key = subject_keys(lm, module_path, self.prefixes, request.prompt, request.subject).mean(0)
        u = self._whiten(mean_key)
        u = u / u.norm()
        # v*: the MLP output at the subject that makes the model produce the target.
        target = optimize_target_value(
            lm, request, lm.adapter.path("mlp", self.layer), self.prefixes,
            v_lr=p.v_lr, v_num_grad_steps=p.v_num_grad_steps, v_weight_decay=p.v_weight_decay,
            clamp_norm_factor=p.clamp_norm_factor, kl_factor=p.kl_factor,
        )
        # Rank-one update so that Ŵ k = v* for the bare prompt's key k.
        key, current = module_io_at_subject(lm, module_path, request.prompt, request.subject)
        right = (target.value - current) / torch.dot(key, u)
        delta_out_in = torch.outer(right, u)
        weight = lm.model.get_parameter(self.weight_path)
        # Conv1D stores in x out: transpose the out x in update into stored orientation.
        stored = delta_out_in.T if lm.adapter.layout == "conv1d" else delta_out_in
        self._update_weight(handle, self.weight_path, stored.to(weight.dtype))
        return {"case_id": request.case_id, "losses": target.losses, "delta_norm": float(delta_out_in.norm()),
                "key": key, "value": target.value, "u": u}

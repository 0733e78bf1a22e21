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
  That variant is :class:`RROME` (below).
* Generated context prefixes drop special tokens (the reference keeps GPT-2's
  ``<|endoftext|>``), so chat markers do not leak into prompts of chat models.
* The reference computes ``C⁻¹`` with ``torch.inverse`` in float32; here the
  system ``C x = k*`` is solved in float64.

r-ROME (Gupta, Sajnani & Anumanchipalli, 2024, "Rebuilding ROME", arXiv 2403.07175)
keeps every step above but uses the prefix-mean key for the whole update:

    Ŵ   = W + r uᵀ,  r = (v* − W k*) / (k*ᵀ u)

so ``Ŵ k* = v*`` for the same ``k*`` that defines ``u`` (v* is, as in ROME, the bare
prompt's MLP output plus the optimised delta). Per-model values live in
``editkit/configs/r-rome.yaml``. Checked against
scalable-model-editing/rebuilding-rome (``rome/compute_v.py`` with
``enable_random_prefix_keys``: the key and the layer's output are both averaged over
the context prefixes) and EasyEdit's ``models/r_rome``. The reference averages the
layer's outputs over the prefixes; since the layer is affine that mean equals
``W k* + b``, which is what is computed here (no extra forward pass).

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

from ..editing import EditHandle
from ..locate import module_io_at_subject, optimize_target_value, subject_keys
from ..types import EditRequest
from .base import LocateEditor, LocateParams, as_stored

__all__ = ["ROME", "ROMEParams", "RROME", "RROMEParams"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ROMEParams(LocateParams):
    """ROME hyperparameters (names and GPT2-XL defaults of the reference's hparams files)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.layers) != 1:
            raise ValueError(f"ROME edits exactly one layer, got layers={self.layers}")


class ROME(LocateEditor):
    """Rank-one edit of one MLP output projection per request (applied one by one)."""

    name = "rome"
    params_class = ROMEParams

    @property
    def layer(self) -> int:
        return self.params.layers[0]

    @property
    def weight_path(self) -> str:
        return self.weight_path_at(self.layer)

    def _whiten(self, key: torch.Tensor) -> torch.Tensor:
        """``C⁻¹ k`` (float64 solve); ``k`` itself when ``mom2_adjustment`` is off."""
        if not self.params.mom2_adjustment:
            return key
        moment = self.second_moment(self.layer)
        return torch.linalg.solve(moment, key.to(moment.dtype)).to(key.dtype)

    # -- the edit -------------------------------------------------------------
    def _apply(self, requests: list[EditRequest], handle: EditHandle) -> None:
        for request in requests:  # ROME is sequential by construction
            handle.info.append(self._apply_one(request, handle))

    def _update_key(self, request: EditRequest, mean_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The key ``k`` the update maps to v*, and the layer's current output ``W k (+ b)`` there.

        ROME (as its reference code) uses the bare prompt's key, although ``u``
        comes from the prefix mean ``mean_key``; :class:`RROME` overrides this.
        """
        module_path = self.lm.adapter.path("mlp_out", self.layer)
        return module_io_at_subject(self.lm, module_path, request.prompt, request.subject)

    def _apply_one(self, request: EditRequest, handle: EditHandle) -> dict[str, Any]:
        lm, p = self.lm, self.params
        module_path = lm.adapter.path("mlp_out", self.layer)
        # u: whitened mean key over the context prefixes, unit norm.
        mean_key = subject_keys(lm, module_path, self.prefixes, request.prompt, request.subject).mean(0)
        u = self._whiten(mean_key)
        u = u / u.norm()
        # v*: the MLP output at the subject that makes the model produce the target.
        target = optimize_target_value(lm, request, lm.adapter.path("mlp", self.layer), self.prefixes,
                                       **p.target_options())
        # Rank-one update so that Ŵ k = v* for the key k chosen by the variant.
        key, current = self._update_key(request, mean_key)
        right = (target.value - current) / torch.dot(key, u)
        delta_out_in = torch.outer(right, u)
        self._update_weight(handle, self.weight_path, as_stored(lm, delta_out_in))
        return {"case_id": request.case_id, "losses": target.losses, "delta_norm": float(delta_out_in.norm()),
                "key": key, "value": target.value, "u": u}


@dataclass(frozen=True)
class RROMEParams(ROMEParams):
    """r-ROME hyperparameters: ROME's, under their own class so digests tell the two apart."""


class RROME(ROME):
    """r-ROME: ROME whose update maps the prefix-mean key k* (the one defining u) to v*."""

    name = "r-rome"
    params_class = RROMEParams

    def _update_key(self, request: EditRequest, mean_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        module = self.lm.adapter.module(self.lm.model, "mlp_out", self.layer)
        with torch.no_grad():
            weight = self.lm.adapter.as_out_in(module.weight).float()  # out x in, whatever the storage
            current = weight @ mean_key.float()
            if getattr(module, "bias", None) is not None:
                current = current + module.bias.float()
        return mean_key, current.detach()

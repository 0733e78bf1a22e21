"""MEMIT: Mass-Editing Memory in a Transformer (Meng et al., 2023, arXiv 2210.07229).

For requests i = 1..n and edit layers l_1 < ... < l_L (MLP output projections):

    z_i  = argmin NLL(target_i) + KL + decay over the output of block l_L at the
           subject's last token (the same optimisation as ROME's v*, hooked on the
           residual stream; :func:`editkit.locate.optimize_target_value`)
    then for each layer l = l_j in increasing order, on the already updated model:
    K    = [k_1 .. k_n], k_i = mean over context prefixes of the key at l  (d_in x n)
    R    = [z_i - h_i] / (L - j + 1), h_i = current output of block l_L   (d x n)
    Δ_l  = R Kᵀ (λ C_l + K Kᵀ)⁻¹,  solved in float64, C_l = E[k kᵀ], λ = mom2_update_weight

so the remaining residual is spread evenly over the layers still to come. Δ_l is
the minimiser of ‖Δ K − R‖² + λ tr(Δ C Δᵀ): it satisfies Δ (K Kᵀ + λ C) = R Kᵀ.
Several requests in one :meth:`~editkit.editing.Editor.edit` call are written
together (batched editing); the study edits one at a time.

Checked against kmeng01/memit (``memit/memit_main.py``, ``compute_z.py``,
``compute_ks.py``) and its ``hparams/MEMIT/*.json`` plus EasyEdit's
``hparams/MEMIT/*.yaml``. Deviations:

* ``C`` comes from :mod:`editkit.stats` in float64 (the reference stores float32
  statistics and solves in float64); with no hub access the default corpus is text
  sampled from the model itself rather than Wikipedia (``mom2_dataset``).
* Context prefixes are sampled by :func:`editkit.locate.context_templates`
  (``((10, 5),)``: five 10-token texts, as the reference's ``[(10, 5)]``), not
  from the reference's five fixed opening words.

PMET, AlphaEdit, EMMET and ENCORE subclass :class:`MEMIT` and override the documented
hooks (:meth:`MEMIT.optimize_targets`, :meth:`MEMIT.spread`, :meth:`MEMIT.solve`);
AlphaEdit and ENCORE also keep the keys of their earlier edits (:class:`KeyRecord`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..editing import EditHandle
from ..locate import module_io_at_subject, optimize_target_value
from ..types import EditRequest
from .base import LocateEditor, LocateParams, as_stored

if TYPE_CHECKING:
    from ..models import LoadedModel

__all__ = ["MEMIT", "MEMITParams", "KeyRecord"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MEMITParams(LocateParams):
    """MEMIT hyperparameters; defaults are the reference's GPT2-XL values."""

    layers: tuple[int, ...] = (13, 14, 15, 16, 17)
    clamp_norm_factor: float = 0.75
    mom2_adjustment: bool = True
    mom2_update_weight: float = 20000.0
    context_template_length_params: tuple[tuple[int, ...], ...] = ((10, 5),)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mom2_update_weight <= 0:
            raise ValueError(f"mom2_update_weight must be positive, got {self.mom2_update_weight}")


class MEMIT(LocateEditor):
    """Multi-layer least-squares editing of MLP output projections (batched)."""

    name = "memit"
    batch_edits = True
    params_class = MEMITParams
    params: MEMITParams

    @property
    def z_layer(self) -> int:
        return self.params.layers[-1]

    # -- hooks for the variants -----------------------------------------------------------------
    def residual_path(self) -> str:
        """Module whose output at the subject is driven to the target: block l_L for MEMIT."""
        return self.lm.adapter.path("blocks", self.z_layer)

    def optimize_targets(self, request: EditRequest) -> tuple[torch.Tensor, tuple[float, ...]]:
        """The target output of :meth:`residual_path` for ``request`` and the loss trace."""
        found = optimize_target_value(self.lm, request, self.residual_path(), self.prefixes,
                                      **self.params.target_options())
        return found.value, found.losses

    def spread(self, index: int) -> float:
        """Divisor of the residual at the ``index``-th edit layer (MEMIT: layers left)."""
        return float(len(self.params.layers) - index)

    def solve(self, index: int, layer: int, keys: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
        """The ``out x in`` update of ``layer`` (float64) for keys ``n x d_in`` and residuals ``n x d_out``."""
        moment = self.second_moment(layer)
        system = self.params.mom2_update_weight * moment + keys.T @ keys
        return residuals.T @ torch.linalg.solve(system, keys.T).T

    def after_edit(self, requests: list[EditRequest], handle: EditHandle) -> None:
        """Called once the update is in place (AlphaEdit records the new keys)."""

    # -- the edit -------------------------------------------------------------------------------
    def _apply(self, requests: list[EditRequest], handle: EditHandle) -> None:
        found = [self.optimize_targets(request) for request in requests]
        targets = torch.stack([value for value, _ in found]).double()
        norms = []
        for index, layer in enumerate(self.params.layers):
            keys = self.mean_keys(requests, layer).double()
            current = torch.stack([
                module_io_at_subject(self.lm, self.residual_path(), r.prompt, r.subject)[1] for r in requests
            ]).double()
            residuals = (targets - current) / self.spread(index)
            delta = self.solve(index, layer, keys, residuals)
            self._update_weight(handle, self.weight_path_at(layer), as_stored(self.lm, delta))
            norms.append(float(delta.norm()))
            log.debug("%s layer %d: |residual| %.3g, |Δ| %.3g", self.name, layer,
                      float(residuals.norm(dim=1).mean()), norms[-1])
        self.after_edit(requests, handle)
        for request, (target, losses) in zip(requests, found):
            handle.info.append({"case_id": request.case_id, "losses": losses, "delta_norms": norms, "target": target})


class KeyRecord(MEMIT):
    """MEMIT that remembers the keys of its earlier edits, per edit layer (AlphaEdit, ENCORE).

    The keys are re-measured after each edit (``m x d_in`` per layer, float32, on the
    CPU); an edit's handle removes what the edit added, :meth:`reset` clears them, and
    they are saved with every run checkpoint (``state_dict``) so a resumed run
    continues exactly.
    """

    def __init__(self, lm: LoadedModel, params: MEMITParams) -> None:
        super().__init__(lm, params)
        self._edit_keys: dict[int, list[torch.Tensor]] = {layer: [] for layer in params.layers}

    def earlier_keys(self, layer: int) -> torch.Tensor:
        """Keys of every earlier edit at ``layer`` (``m x d_in``, float64; m may be 0)."""
        rows = self._edit_keys[layer]
        if not rows:
            weight = self.lm.model.get_parameter(self.weight_path_at(layer))
            width = self.lm.adapter.as_out_in(weight).shape[1]
            return torch.zeros(0, width, dtype=torch.float64, device=self.lm.device)
        return torch.cat(rows).to(self.lm.device, torch.float64)

    def after_edit(self, requests: list[EditRequest], handle: EditHandle) -> None:
        for layer in self.params.layers:
            self._edit_keys[layer].append(self.mean_keys(requests, layer).float().cpu())
        handle.add_undo(self._forget_last)

    def _forget_last(self) -> None:
        for rows in self._edit_keys.values():
            if rows:
                rows.pop()

    def reset(self) -> None:
        for rows in self._edit_keys.values():
            rows.clear()

    def state_dict(self) -> dict[str, Any]:
        keys = {layer: torch.cat(rows) if rows else None for layer, rows in self._edit_keys.items()}
        return {**super().state_dict(), "edit_keys": keys}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        saved = state.get("edit_keys") or {}
        self._edit_keys = {layer: [] for layer in self.params.layers}
        for layer, keys in saved.items():
            if layer not in self._edit_keys:
                raise ValueError(f"saved {self.name} state has keys for layer {layer}, "
                                 f"not in layers {self.params.layers}")
            if keys is not None:
                self._edit_keys[layer].append(keys.float().cpu())

"""UltraEdit: training-, subject- and memory-free lifelong editing (Gu et al., 2025, arXiv 2505.14679).

UltraEdit writes each batch of edits with one closed-form solve per edited linear map
``y = W u`` and no optimisation loop. For the batch's teacher-forced NLL of
``target_new`` after each prompt, it reads at every answer position t (a position
whose next token is a target token) the module's input ``k_t`` and the gradient
``g_t = ∂L/∂y_t`` of its output (:func:`editkit.editors.gradients.token_factors`).

Lifelong normalisation: running per-feature statistics of ``z_t = [k_t; g_t]``
(one set per weight shape, shared by the maps of that shape, updated with every
batch and never reset between edits) standardise them, ``ẑ = (z − mean) / (std + eps)``,
split back into ``(k̂_t, ĝ_t)``. Each answer position asks for the output change

    v_t = −lr · |k̂_t|² · ĝ_t                                   (a normalised descent step)

and the update is the ridge least-squares map from the raw keys to those changes::

    Δᵀ = (Kᵀ K + ridge · I)⁻¹ Kᵀ V,   W ← W + Δ                  (K: tokens x in, V: tokens x out)

All maps' updates come from one pass of the current (already edited) model and are
added together; the next batch sees them.

Checked against XiaojieGu/UltraEdit (``editor/ultraedit.py``: ``cache`` and
``predict_param_shifts``; ``nets.py``: ``RunningMeanStd``; ``util.py``: ``TracerDict``
with ``token: ans``; ``config/editor/ultraedit.yaml``: lr 1e-6; ``config/model/*.yaml``:
the edited modules). Defaults are the Llama-3-8B-Instruct file's modules (``gate_proj``
of blocks 11-15 and ``up_proj`` of blocks 18-24) and lr 1e-6. Known deviations:

* The statistics use Chan et al.'s update in float64 (:class:`~editkit.editors.mend_net.RunningMoments`),
  with the sample variance; with fewer than two observed positions the
  standardisation is the identity. The reference divides by ``std + eps`` with a zero
  std there, so a first batch of one single-token edit becomes ``0 / eps = 0``: no edit.
* ``warmup_records`` (default 0, the published behaviour) first feeds the statistics
  with the (k, g) of that many records of the edit data's ``train`` split, read one
  record at a time from the unedited model. It changes no weight: it gives a short or
  single-edit sequence the statistics a long one builds up as it goes. Per-model
  files that set it say so.
* The reference pads its batch to 128 rows before normalising; rows are normalised
  one by one, so padding changes nothing and is left out.
* Solves run in float64; the update is added in float32 and rounded once to the
  weight's dtype (:meth:`Editor._update_weight`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..config import Params
from ..datasets import load_edit_requests
from ..editing import EditHandle, Editor
from ..hooks import get_module
from ..types import EditRequest
from .base import as_stored
from .gradients import projection_path, token_factors
from .mend_net import RunningMoments

if TYPE_CHECKING:
    from ..models import LoadedModel

__all__ = ["UltraEdit", "UltraEditParams", "module_paths"]

log = logging.getLogger(__name__)

_LLAMA3_MODULES = (*(f"{layer}:mlp.gate_proj" for layer in range(11, 16)),
                   *(f"{layer}:mlp.up_proj" for layer in range(18, 25)))


@dataclass(frozen=True)
class UltraEditParams(Params):
    """UltraEdit hyperparameters; defaults: the reference's Llama-3-8B-Instruct files.

    ``modules`` are ``"<block>:<role>"``: an adapter role (``mlp_in``, ``mlp_out``) or a
    path inside the block (``mlp.gate_proj``); a negative block counts from the last.
    """

    modules: tuple[str, ...] = _LLAMA3_MODULES
    lr: float = 1e-6
    ridge: float = 1.0        # the identity added to Kᵀ K (fixed at 1 in the reference)
    warmup_records: int = 0   # train-split records whose (k, g) seed the statistics (0: published)
    train_data: str = "counterfact"

    def __post_init__(self) -> None:
        if not self.modules:
            raise ValueError("modules must name at least one '<block>:<role>'")
        for entry in self.modules:
            block, _, role = str(entry).partition(":")
            if not role or not block.lstrip("-").isdigit():
                raise ValueError(f"each module is '<block>:<role>' (e.g. '11:mlp.gate_proj'), got {entry!r}")
        if self.lr <= 0 or self.ridge <= 0:
            raise ValueError(f"lr and ridge must be positive, got {self.lr} and {self.ridge}")
        if self.warmup_records < 0:
            raise ValueError(f"warmup_records must be >= 0, got {self.warmup_records}")


def module_paths(lm: LoadedModel, modules: Sequence[str]) -> list[str]:
    """Module paths of ``"<block>:<role>"`` entries, each a 2-D projection of ``lm``."""
    return [projection_path(lm, int(block), role, "UltraEdit")
            for block, _, role in (entry.partition(":") for entry in modules)]


class UltraEdit(Editor):
    """Closed-form lifelong editing: normalised gradient steps solved onto the keys, no training."""

    name = "ultraedit"
    params_class = UltraEditParams
    params: UltraEditParams

    def __init__(self, lm: LoadedModel, params: UltraEditParams) -> None:
        super().__init__(lm, params)
        self.paths = module_paths(lm, params.modules)
        self.shapes = [self._shape(path) for path in self.paths]  # (in, out)
        self.moments = {shape: RunningMoments(sum(shape)).to(lm.device) for shape in dict.fromkeys(self.shapes)}
        self._warm = params.warmup_records == 0

    def _shape(self, path: str) -> tuple[int, int]:
        out_in = self.lm.adapter.as_out_in(get_module(self.lm.model, path).weight)
        return int(out_in.shape[1]), int(out_in.shape[0])

    # -- statistics ------------------------------------------------------------------

    def _observe(self, factors: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """Feed each map's ``[k; g]`` rows to its shape's statistics; returns those rows."""
        features = [torch.cat([u, d], dim=-1) for u, d, _ in factors]
        for shape, z in zip(self.shapes, features):
            self.moments[shape].observe(z)
        return features

    def prepare(self) -> None:
        """Seed the statistics now (else the first edit does): ``warmup_records`` train records,
        one at a time, on the model as it is (call it before any edit: the unedited model)."""
        if not self._warm:
            self._warm_up()

    def _warm_up(self) -> None:
        records = load_edit_requests(self.params.train_data, "train", self.params.warmup_records)
        log.info("UltraEdit: seeding the normalisation statistics with %d %s train records",
                 len(records), self.params.train_data)
        for request in records:
            factors, _, _ = token_factors(self.lm, self.paths, [[request]], at="targets")
            self._observe(factors)
        self._warm = True

    def _snapshot(self) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
        return {shape: {k: v.clone() for k, v in m.state_dict().items()} for shape, m in self.moments.items()}

    def _load_snapshot(self, snapshot: dict[tuple[int, int], dict[str, torch.Tensor]]) -> None:
        for shape, state in snapshot.items():
            self.moments[shape].load_state_dict(state)

    # -- editing ---------------------------------------------------------------------

    def _apply(self, requests: list[EditRequest], handle: EditHandle) -> None:
        if not self._warm:
            self._warm_up()  # before the first edit: statistics of the unedited model only
        before = self._snapshot()
        handle.add_undo(lambda: self._load_snapshot(before))
        factors, nll, _ = token_factors(self.lm, self.paths, [requests], at="targets")
        features = self._observe(factors)
        norms = []
        for path, shape, (u, _, _), rows in zip(self.paths, self.shapes, factors, features):
            z = self.moments[shape].standardise(rows).double()
            k_hat, g_hat = z.split([shape[0], shape[1]], dim=-1)
            values = -self.params.lr * k_hat.pow(2).sum(-1, keepdim=True) * g_hat
            keys = u.double()
            gram = keys.T @ keys + self.params.ridge * torch.eye(shape[0], dtype=torch.float64, device=keys.device)
            shift = torch.linalg.solve(gram, keys.T @ values)  # in x out
            delta = shift.T.contiguous()                        # out x in
            norms.append(float(delta.norm()))
            self._update_weight(handle, f"{path}.weight", as_stored(self.lm, delta.float()))
        log.debug("UltraEdit edit of %d request(s): |ΔW| per map %s", len(requests), norms)
        handle.info.extend({"case_id": r.case_id, "nll_before": float(v), "delta_norms": norms}
                           for r, v in zip(requests, nll[0]))

    # -- run state -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"warm": self._warm,
                "moments": {f"{i}x{o}": state for (i, o), state in self._snapshot().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        moments = state.get("moments", {})
        self._load_snapshot({tuple(int(x) for x in key.split("x")): value for key, value in moments.items()})
        self._warm = bool(state.get("warm", self._warm))

    def reset(self) -> None:
        """Forget the statistics of the edits (a warm-up is recomputed before the next edit)."""
        for moments in self.moments.values():
            moments.count.zero_()
            moments.mean.zero_()
            moments.m2.zero_()
        self._warm = self.params.warmup_records == 0

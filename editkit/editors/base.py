"""What the locate-then-edit editors (ROME, MEMIT, PMET, AlphaEdit) share besides the maths.

:class:`LocateParams` holds the hyperparameters every one of them takes, under the
reference implementations' names, so a published ``hparams`` file maps one to one.
:class:`LocateEditor` owns the per-editor state those methods reuse across edits:
the sampled context prefixes and the key second-moment statistics ``C`` of the
edited layers. Both are computed once, lazily, and kept on the editor object.

Every locate-then-edit editor also takes three options for lifelong editing, off by
default (and then absent from :meth:`~editkit.config.Params.digest`, so earlier run
ids stand): most-probable early stopping of the target optimisation
(``prob_cutoff``, ENCORE's MPES, see :func:`editkit.locate.optimize_target_values`),
RECT (``rect_top_k``) and PRUNE (``prune``, ``prune_alpha``), applied to every
update as :meth:`LocateEditor._update_weight` writes it (see
:mod:`editkit.editors.regularize`). The references apply RECT and PRUNE once all
of an edit's layers are computed; here a later MEMIT layer sees the regularised
earlier ones, so its residual makes up for what they dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..config import Params, option
from ..editing import EditHandle, Editor
from ..hooks import get_parameter
from ..locate import context_templates, subject_keys
from ..stats import second_moments
from ..types import EditRequest
from .regularize import rect_sparsify, restrain_perturbation

if TYPE_CHECKING:
    from ..models import LoadedModel

__all__ = ["LocateParams", "LocateEditor", "as_stored"]


@dataclass(frozen=True)
class LocateParams(Params):
    """Hyperparameters common to ROME-family editors (defaults: ROME on GPT2-XL)."""

    layers: tuple[int, ...] = (17,)
    fact_token: str = "subject_last"
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    # Accepted for compatibility with published configs: like the references, the
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
    # Lifelong-editing options (off by default; see the module docstring). prob_cutoff < 0:
    # MPES, stop the target optimisation at the |prob_cutoff|-th step on which the target is
    # the most probable token everywhere; > 0: once its mean probability exceeds it (ENCORE).
    prob_cutoff: float = option(0.0)
    rect_top_k: float | None = option(None)   # RECT: fraction of update entries kept (paper: 0.2)
    prune: bool = option(False)               # PRUNE: restrain the accumulated perturbation
    prune_alpha: float = option(1.2)          # PRUNE's log base (the authors' default "log1_2")

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("layers must name at least one layer")
        if list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"layers must be increasing and distinct, got {self.layers}")
        if self.fact_token != "subject_last":
            raise ValueError(f"only fact_token='subject_last' is implemented, got {self.fact_token!r}")
        if self.v_num_grad_steps < 1 or self.v_lr <= 0 or self.clamp_norm_factor <= 0:
            raise ValueError("v_num_grad_steps, v_lr and clamp_norm_factor must be positive")
        if self.mom2_n_samples < 1:
            raise ValueError(f"mom2_n_samples must be positive, got {self.mom2_n_samples}")
        if self.rect_top_k is not None and not 0 < self.rect_top_k <= 1:
            raise ValueError(f"rect_top_k must be in (0, 1], got {self.rect_top_k}")
        if self.prune_alpha <= 1:
            raise ValueError(f"prune_alpha must exceed 1, got {self.prune_alpha}")

    def target_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`editkit.locate.optimize_target_values`."""
        return dict(v_lr=self.v_lr, v_num_grad_steps=self.v_num_grad_steps, v_weight_decay=self.v_weight_decay,
                    clamp_norm_factor=self.clamp_norm_factor, kl_factor=self.kl_factor, prob_cutoff=self.prob_cutoff)


def as_stored(lm: LoadedModel, delta_out_in: torch.Tensor) -> torch.Tensor:
    """An ``out x in`` update in the parameter's stored orientation (GPT-2's Conv1D is ``in x out``)."""
    return lm.adapter.as_out_in(delta_out_in)  # the layout change is a transpose: its own inverse


class LocateEditor(Editor):
    """Base class: context prefixes and key statistics, computed once per editor."""

    params: LocateParams

    def __init__(self, lm: LoadedModel, params: LocateParams) -> None:
        super().__init__(lm, params)
        bad = [layer for layer in params.layers if not 0 <= layer < lm.n_layers]
        if bad:
            raise ValueError(f"{self.name}: layers {bad} are out of range for {lm.name} ({lm.n_layers} layers)")
        self._prefixes: list[str] | None = None
        self._moments: dict[int, torch.Tensor] = {}
        # PRUNE: each edited weight before this editor's first edit, and its largest singular value.
        self._pristine: dict[str, torch.Tensor] = {}
        self._bounds: dict[str, float] = {}

    @property
    def prefixes(self) -> list[str]:
        """Context prefixes (``""`` first), sampled once per editor with the editor's seed."""
        if self._prefixes is None:
            self._prefixes = context_templates(self.lm, self.params.context_template_length_params, self.params.seed)
        return self._prefixes

    def key_path(self, layer: int) -> str:
        """The module whose input is the key: the MLP output projection of ``layer``."""
        return self.lm.adapter.path("mlp_out", layer)

    def weight_path_at(self, layer: int) -> str:
        return self.lm.adapter.weight_path("mlp_out", layer)

    def mean_keys(self, requests: list[EditRequest], layer: int) -> torch.Tensor:
        """Keys at the subject's last token averaged over the prefixes, one row per request."""
        return torch.stack([
            subject_keys(self.lm, self.key_path(layer), self.prefixes, r.prompt, r.subject).mean(0) for r in requests
        ])

    def second_moment(self, layer: int) -> torch.Tensor:
        """``C = E[k kᵀ]`` at ``layer`` (float64, on the model's device); identity when
        ``mom2_adjustment`` is off. All edited layers are accumulated in one corpus pass."""
        p = self.params
        if not p.mom2_adjustment:
            weight = self.lm.model.get_parameter(self.weight_path_at(layer))
            width = self.lm.adapter.as_out_in(weight).shape[1]
            return torch.eye(width, dtype=torch.float64, device=self.lm.device)
        if layer not in self._moments:
            paths = {self.key_path(layer_): layer_ for layer_ in p.layers}
            moments = second_moments(self.lm, list(paths), p.mom2_dataset, p.mom2_n_samples, p.mom2_dtype,
                                     seed=p.seed)
            self._moments.update({paths[path]: value.double() for path, value in moments.items()})
        return self._moments[layer].to(self.lm.device)

    def _update_weight(self, handle: EditHandle, path: str, delta: torch.Tensor) -> None:
        """Write ``delta`` as :meth:`Editor._update_weight` does, after RECT and followed by PRUNE when set."""
        p = self.params
        parameter = get_parameter(self.lm.model, path)
        if p.rect_top_k is not None:
            delta = rect_sparsify(delta, parameter, p.rect_top_k)
        if p.prune and path not in self._pristine:
            self._pristine[path] = parameter.detach().clone()
        super()._update_weight(handle, path, delta)
        if p.prune:
            self._restrain(path)

    def _restrain(self, path: str) -> None:
        """PRUNE: replace the accumulated perturbation of ``path`` by its restrained version (rounded once)."""
        original = self._pristine[path].double()
        if path not in self._bounds:
            self._bounds[path] = float(torch.linalg.matrix_norm(original, ord=2))
        parameter = get_parameter(self.lm.model, path)
        restrained = restrain_perturbation(parameter.double() - original, self._bounds[path], self.params.prune_alpha)
        with torch.no_grad():
            parameter.copy_((original + restrained).to(parameter.dtype))

    def adopt_originals(self, originals: dict[str, torch.Tensor]) -> None:
        if self.params.prune:
            self._pristine.update({path: tensor.detach().clone() for path, tensor in originals.items()})

    def state_dict(self) -> dict[str, Any]:
        return {"prefixes": list(self.prefixes)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "prefixes" in state:
            self._prefixes = list(state["prefixes"])

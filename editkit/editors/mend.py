"""MEND: Model Editor Networks with Gradient Decomposition (Mitchell et al., 2021, arXiv 2110.11309).

For a linear map ``y = W u`` inside the model (``W`` is ``out x in``), the gradient of
a loss L over a sequence is a sum of rank-one terms, one per token position t::

    ∇_W L = Σ_t δ_t u_tᵀ        u_t = the module's input at t,  δ_t = ∂L/∂y_t

MEND never forms ∇_W L from scratch: a small trained network g maps each pair
(u_t, δ_t) to (ũ_t, δ̃_t), and the edit is

    W ← W − α_l Σ_t δ̃_t ũ_tᵀ                                   (one α_l per edited weight)

with L the teacher-forced NLL of ``target_new`` after the prompt, averaged over the
target tokens of every request of the ``edit`` call (several requests are one sum).

The network g (one per distinct weight shape when ``shared``; the published one):

* inputs standardised by running statistics, ``z = (x − mean) / (std + 1e-7)``, kept
  as buffers (count, mean, sum of squared deviations) and updated in training only;
* ``combine``: ``[z_u; z_δ]`` goes through one network and the output is split back;
* ``n_hidden + 1`` low-rank residual layers ("IDMLP" of ``LRLinear``), for a mode m
  (the index of the weight among those of its shape)::

      h ← h + relu(s_m ⊙ (A B h + b) + o_m)       A: width x r (zeros), B: r x width (N(0, 1))

  so with ``init="id"`` g starts as the identity; ``s_m`` and ``o_m`` (the per-weight
  scale and shift, "mode shift") start at 1 and 0. As in the reference every layer,
  the last included, has the relu, written as ``clamp(min=0)`` so that its gradient at
  0 (every pre-activation at init) is 1: with ``torch.relu`` g would never leave the identity.

Training (:class:`MENDTrainable`, run by :func:`editkit.editors.trainer.train_editor`) makes
the edit a differentiable function of g's parameters and the α's: a forward hook adds
``x ↦ −α Σ_t δ̃_t (ũ_tᵀ x)`` to each edited module's output, so the base weights are
never written (and GPT-2's Conv1D orientation never matters). For an edit request with
rephrases P' and a locality text x_loc (its neighbourhood prompt and answer)::

    L = c_edit · NLL_edited(target_new | prompt and P') + c_loc · KL(p_base(·|x_loc) ‖ p_edited(·|x_loc))

the KL averaged over every position of x_loc. Each optimiser step averages L over
``accumulate_bs`` independent edits of ``batch_size`` requests; only g and the α's
learn. u and δ come from the unedited model and are constants (no second order).

Checked against eric-mitchell/mend (``algs/mend.py``, ``nn.py`` as copied in EasyEdit's
``local_nn.py``, ``hooks.py``, ``trainer.py``, ``losses.py``) and EasyEdit
``easyeditor/trainer/algs/MEND.py`` with ``hparams/TRAINING/MEND/{gpt2-xl,gpt-j-6B,
llama-7b}.yaml``. Known deviations:

* The update is ``W − α ∇̃W`` as in the paper. Both references add ``+ α ∇̃W``, a
  sign error the author acknowledged (eric-mitchell/mend issue 13): training flips it.
* The ``accumulate_bs`` edits of a step run as one batched pass, each edit acting
  only on its own rows; the normalisation statistics take in all of the step's
  tokens before normalising them (the reference: edit by edit). An optimiser step
  is taken every ``accumulate_bs`` edits from the first one.
* The post-edit NLL is read on the edit prompt and its rephrases (``edit_loss_on``);
  eric-mitchell/mend reads the rephrase only, EasyEdit the prompt only.
* The base model stays in eval mode during training (the reference puts it in train
  mode, so GPT-2's dropout is active when u and δ are taken).
* No early stopping: the weights after ``max_iters`` iterations are saved (the
  reference keeps the best validation checkpoint).
* With fewer than two observed samples the standardisation is the identity (the
  reference holds NaN there); statistics are accumulated in float64.
* Target tokens are the continuation of prompt + " target" (:func:`editkit.tokens.encode_pair`),
  and logits are computed only at the positions a loss reads.
* ``layers`` may be negative (counted from the last block); ``roles`` are adapter roles
  or module paths inside a block (``mlp.gate_proj`` for Llama's gate projection).
* Not accepted: ``one_sided``, ``x_only``, ``delta_only``, ``dropout``, ``train_base``,
  ``cbase``, ``hidden_dim``, ``mlp_class`` and ``lr_scale`` (the published files leave
  them off, at 0, or at 1; IDMLP is the only network).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..editing import EditHandle, Editor
from ..losses import group_mean, target_nll
from ..tokens import encode, target_text
from ..training import ArtifactKey, Trainable, data_digest, load_artifact, train_command
from ..types import EditRequest
from .base import as_stored
from .gradients import TargetPass, token_factors
from .mend_net import (  # noqa: F401  (the building blocks of g are re-exported)
    GradientTransform,
    LowRankMLP,
    LowRankResidual,
    MENDNet,
    MENDParams,
    RunningMoments,
    edited_modules,
)

if TYPE_CHECKING:
    from ..models import LoadedModel

__all__ = ["MEND", "MENDParams", "MENDNet", "MENDTrainable", "edited_modules"]

log = logging.getLogger(__name__)


@dataclass
class _Edit:
    """Requests edited together, with the texts the training losses read."""

    requests: list[EditRequest]
    locality: list[str]


def _locality_text(request: EditRequest, fallback: EditRequest) -> str:
    """The request's first locality prompt with its answer, else another record's prompt."""
    if request.locality_prompts:
        answer = request.locality_answers[0] if request.locality_answers else ""
        return request.locality_prompts[0] + (target_text(answer) if answer else "")
    return fallback.prompt + (target_text(fallback.target_true) if fallback.target_true else "")


def _low_rank_hook(factors: list[tuple[torch.Tensor, torch.Tensor]], bounds: list[tuple[int, int]]):
    """Forward hook adding, on rows ``bounds[e]``, ``x ↦ Σ_t d_t (u_tᵀ x)`` of edit e's factors (u, d)."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0].float()
        x = x.reshape(bounds[-1][1], -1, x.shape[-1])
        parts = [(x[start:stop] @ u.T) @ d for (u, d), (start, stop) in zip(factors, bounds)]
        return output + torch.cat(parts).reshape(output.shape).to(output.dtype)

    return hook


# -- training -----------------------------------------------------------------------


class MENDTrainable(Trainable):
    """g and the α's, trained on edits of ``train`` requests (see the module docstring)."""

    def __init__(self, lm: LoadedModel, params: MENDParams, train: Sequence[EditRequest],
                 val: Sequence[EditRequest] = ()) -> None:
        if len(train) < 2:
            raise ValueError("MEND training needs at least two training requests")
        self.lm, self.params = lm, params
        self.paths = edited_modules(lm, params)
        self.module = MENDNet.for_model(lm, params).to(lm.device)
        self.steps = math.ceil(params.max_iters / params.accumulate_bs)
        self.grad_clip = params.grad_clip
        self.train, self.val = list(train), list(val)

    def param_groups(self) -> list[dict[str, Any]]:
        net = [p for name, p in self.module.named_parameters() if name != "edit_lrs"]
        return [{"params": net, "lr": self.params.lr}, {"params": [self.module.edit_lrs], "lr": self.params.lr_lr}]

    def sample(self, rng: random.Random) -> list[_Edit]:
        p = self.params
        edits = []
        for _ in range(p.accumulate_bs):
            requests = [self.train[rng.randrange(len(self.train))] for _ in range(p.batch_size)]
            others = [self.train[rng.randrange(len(self.train))] for _ in requests]
            edits.append(_Edit(requests, [_locality_text(r, o) for r, o in zip(requests, others)]))
        return edits

    def _outer_prompts(self, request: EditRequest) -> list[str]:
        on = self.params.edit_loss_on
        rephrases = list(request.rephrase_prompts)
        prompts = [request.prompt] if on in ("prompt", "both") or not rephrases else []
        return prompts + (rephrases if on in ("rephrase", "both") else [])

    def _losses(self, edits: list[_Edit]) -> dict[str, torch.Tensor]:
        """Per edit: NLL before, NLL and accuracy after (outer prompts), locality KL."""
        lm, device = self.lm, self.lm.device
        locality = [text for edit in edits for text in edit.locality]
        factors, nll_before, base_lp = token_factors(lm, self.paths, [e.requests for e in edits], locality)
        per_path = []
        for index, (u, d, token_edit) in enumerate(factors):
            u_tilde, d_tilde = self.module.factors(index, u, d)
            per_path.append([(u_tilde[token_edit == e], d_tilde[token_edit == e]) for e in range(len(edits))])

        batch, bounds = TargetPass(), []
        target_q, labels, target_edit, loc_q, loc_edit = [], [], [], [], []
        for e, edit in enumerate(edits):
            start = len(batch.rows)
            for request in edit.requests:
                for prompt in self._outer_prompts(request):
                    rows, answer = batch.add_target(lm.tokenizer, prompt, request.target_new)
                    target_q.extend(rows)
                    labels.extend(answer)
                    target_edit.extend([e] * len(rows))
            for ids in (encode(lm.tokenizer, text) for text in edit.locality):
                rows = batch.add(ids, range(len(ids)))
                loc_q.extend(rows)
                loc_edit.extend([e] * len(rows))
            bounds.append((start, len(batch.rows)))
        hooks = [(path, _low_rank_hook(per_path[i], bounds)) for i, path in enumerate(self.paths)]
        logits, _ = batch.logits(lm, hooks)
        n = len(edits)
        target_logits = logits[torch.tensor(target_q, device=device)]
        label = torch.tensor(labels, device=device)
        target_edit = torch.tensor(target_edit, device=device)
        correct = (target_logits.detach().log_softmax(-1).argmax(-1) == label).float()
        post = logits[torch.tensor(loc_q, device=device)].log_softmax(-1)
        kl = (base_lp.exp() * (base_lp - post)).sum(-1)  # base rows are in the same order as loc_q
        return {
            "nll_before": torch.stack([x.mean() for x in nll_before]),
            "nll_after": target_nll(target_logits, label, groups=target_edit, n_groups=n),
            "acc": (group_mean(correct, target_edit, n) == 1).float(),
            "loc_kl": group_mean(kl, torch.tensor(loc_edit, device=device), n),
        }

    def loss(self, batch: list[_Edit]) -> tuple[torch.Tensor, dict[str, float]]:
        values = self._losses(batch)
        per_edit = self.params.cedit * values["nll_after"] + self.params.cloc * values["loc_kl"]
        return per_edit.mean(), {k: float(v.detach().mean()) for k, v in values.items()}

    def validate(self) -> dict[str, float]:
        """Mean over ``val`` (one request per edit) of NLL before/after, exact-match accuracy after and locality KL."""
        if not self.val:
            return {}
        rows: dict[str, list[torch.Tensor]] = {}
        fallback = self.val[1:] + self.val[:1]
        edits = [_Edit([r], [_locality_text(r, o)]) for r, o in zip(self.val, fallback)]
        for start in range(0, len(edits), self.params.accumulate_bs):
            for key, value in self._losses(edits[start:start + self.params.accumulate_bs]).items():
                rows.setdefault(key, []).append(value.detach())
        return {key: float(torch.cat(values).mean()) for key, values in rows.items()}


# -- the editor -----------------------------------------------------------------------


class MEND(Editor):
    """Edit with a trained MEND network (load it with :func:`editkit.editors.trainer.train_editor` first).

    Args:
        net: an already trained (or, in tests, untrained) :class:`MENDNet` to use
            instead of the saved artifact.

    Raises:
        MissingArtifactError: nothing is trained for this model, data and settings
            (the message holds the ``python -m editkit train mend ...`` command).
    """

    name = "mend"
    batch_edits = True
    params_class = MENDParams
    needs_training = True

    def __init__(self, lm: LoadedModel, params: MENDParams, net: MENDNet | None = None) -> None:
        super().__init__(lm, params)
        self.module_paths = edited_modules(lm, params)
        if net is None:
            net = MENDNet.for_model(lm, params)
            self.artifact: dict[str, Any] | None = load_artifact(self.artifact_key(lm, params), net)
        else:
            self.artifact = None
        self.net = net.to(lm.device).eval()

    @classmethod
    def artifact_key(cls, lm: LoadedModel, params: MENDParams) -> ArtifactKey:
        return ArtifactKey(method="mend", model=lm.name, data=params.train_data,
                           data_digest=data_digest(params.train_data), digest=params.digest(),
                           command=train_command("mend", lm, params))

    @classmethod
    def trainable(cls, lm: LoadedModel, params: MENDParams, train: Sequence[EditRequest],
                  val: Sequence[EditRequest] = ()) -> MENDTrainable:
        return MENDTrainable(lm, params, train, val)

    def _apply(self, requests: list[EditRequest], handle: EditHandle) -> None:
        self.net.eval()
        factors, nll, _ = token_factors(self.lm, self.module_paths, [requests])
        squares = 0.0
        with torch.no_grad():
            for index, (path, (u, d, _)) in enumerate(zip(self.module_paths, factors)):
                u_tilde, d_tilde = self.net.factors(index, u, d)
                delta = d_tilde.T @ u_tilde  # out x in: −α Σ_t δ̃_t ũ_tᵀ
                squares += float(delta.double().pow(2).sum())
                self._update_weight(handle, f"{path}.weight", as_stored(self.lm, delta))
        norm = math.sqrt(squares)
        log.debug("MEND edit of %d request(s): |ΔW| = %.4g", len(requests), norm)
        handle.info.extend({"case_id": r.case_id, "nll_before": float(v), "delta_norm": norm}
                           for r, v in zip(requests, nll[0]))

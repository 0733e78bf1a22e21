"""SERAC's trained counterfactual model (Mitchell et al., 2022, section 3), and its joint training with the classifier.

The counterfactual model h_ψ(z_e, x) answers an input x that the scope classifier put in
the scope of edit z_e. As published, it is a small language model fine-tuned on the edit
data's train split to give the edit's answer for in-scope inputs read after the edit:
for each record, the loss is ``-log p_ψ(target_new | template(edit, x))`` (mean over the
target's tokens) for x its prompt and each rephrase, where ``template`` is the same one
the router writes (:attr:`SERACParams.template`). EasyEdit trains the classifier and this
model together, one loss summed over both (``trainer/algs/SERAC.py``: classifier loss
plus the replacement model's loss on in-scope inputs); :class:`JointTrainable` does the
same over one batch of records, so ``python -m editkit train serac`` trains both into one
artifact.

Which small model. EasyEdit pairs GPT2-XL with GPT-2 (``small_name: gpt2``), a smaller
model sharing the edited model's tokenizer. ``cf_model`` names one (a catalog name, hub id
or folder; its tokenizer must encode text as the edited model's does, since scores are
compared token for token). With ``cf_model`` None the counterfactual model starts from a
copy of the edited model's own weights: the offline models have no smaller sibling with
their tokenizer (SmolLM2-135M is the smallest SmolLM2).

At inference :class:`~editkit.editors.serac.SERAC` returns in-scope contexts as
:class:`~editkit.routing.Delegated` texts that name this model, so the engine and a direct
``lm.model(...)`` call both run it, on the routed text, instead of the edited model.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..config import Params
from ..losses import target_nll
from ..models import LoadedModel, load_model
from ..tokens import same_encoding
from ..training import Trainable
from ..types import EditRequest
from .gradients import TargetPass

__all__ = ["CounterfactualTrainable", "JointTrainable", "counterfactual_lm", "edit_statement", "in_scope_pass"]


def edit_statement(request: EditRequest) -> str:
    """An edit as SERAC stores it: ``"{prompt} {target_new}"``."""
    return f"{request.prompt} {request.target_new}"


def counterfactual_lm(lm: LoadedModel, params: Params) -> LoadedModel:
    """The counterfactual model before its trained weights are loaded (module docstring), on ``lm``'s device and dtype.

    Raises:
        ValueError: ``cf_model``'s tokenizer encodes text differently from ``lm``'s.
    """
    if params.cf_model is not None:
        small = load_model(params.cf_model, dtype=lm.dtype, device=lm.device)
        if not same_encoding(small.tokenizer, lm.tokenizer):
            raise ValueError(f"SERAC's cf_model {params.cf_model!r} does not share {lm.name!r}'s tokenizer")
        model, adapter, name = small.model, small.adapter, params.cf_model
    else:
        # A fresh module from the config, then the weights: a deep copy would also copy hooks on lm.model.
        model = type(lm.model)._from_config(lm.model.config)
        model.load_state_dict(lm.model.state_dict())
        model = model.to(device=lm.device, dtype=lm.dtype)
        adapter, name = lm.adapter, lm.name
    model.eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=lm.tokenizer, adapter=adapter, name=f"{name} (SERAC counterfactual)")


def in_scope_pass(cf: LoadedModel, template: str, records: Sequence[EditRequest]
                  ) -> tuple[TargetPass, torch.Tensor, torch.Tensor, int]:
    """Teacher-forced rows for every record's prompt and rephrases read after its edit statement.

    Returns the pass, the label of each query, the example each query belongs to, and the number of examples.
    """
    batch, labels, groups = TargetPass(), [], []
    n = 0
    for record in records:
        edit = edit_statement(record)
        for text in (record.prompt, *record.rephrase_prompts):
            queries, answer = batch.add_target(cf.tokenizer, template.format(edit=edit, input=text), record.target_new)
            labels.extend(answer)
            groups.extend([n] * len(queries))
            n += 1
    return batch, torch.tensor(labels, device=cf.device), torch.tensor(groups, device=cf.device), n


class CounterfactualTrainable(Trainable):
    """h_ψ's loss: the mean NLL of ``target_new`` after ``template(edit, x)`` over in-scope x (module docstring)."""

    def __init__(self, cf: LoadedModel, params: Params, val: Sequence[EditRequest]) -> None:
        self.cf = cf
        self.module = cf.model
        self.params = params
        self.steps = params.steps
        self.grad_clip = params.grad_clip
        self.val = list(val)[: params.val_records or None]

    def param_groups(self) -> list[dict[str, Any]]:
        self.module.requires_grad_(True)
        return [{"params": [p for p in self.module.parameters() if p.requires_grad], "lr": self.params.cf_lr}]

    def sample(self, rng: random.Random) -> list[EditRequest]:  # JointTrainable samples for both
        raise NotImplementedError("the counterfactual model trains inside JointTrainable")

    def nll(self, records: Sequence[EditRequest]) -> torch.Tensor:
        """The mean over in-scope examples of each example's mean target NLL."""
        batch, labels, groups, n = in_scope_pass(self.cf, self.params.template, records)
        logits, _ = batch.logits(self.cf)
        return target_nll(logits, labels, groups=groups, n_groups=n).mean()

    def loss(self, batch: Sequence[EditRequest]) -> tuple[torch.Tensor, dict[str, float]]:
        loss = self.nll(batch[: self.params.cf_records or None])
        return loss, {"cf_nll": loss.item()}

    def validate(self) -> dict[str, float]:
        """On validation edits: the NLL, and how often the answer's first token is the greedy one."""
        if not self.val:
            return {}
        batch, labels, groups, n = in_scope_pass(self.cf, self.params.template, self.val)
        logits, _ = batch.logits(self.cf)
        first = torch.ones_like(groups, dtype=torch.bool)
        first[1:] = groups[1:] != groups[:-1]
        top = logits.argmax(-1)[first] == labels[first]
        return {"cf_nll": float(target_nll(logits, labels, groups=groups, n_groups=n).mean()),
                "cf_first_token_top1": float(top.float().mean())}


class JointTrainable(Trainable):
    """The scope classifier and the counterfactual model trained on one loss over one batch of records (EasyEdit)."""

    def __init__(self, scope: Trainable, counterfactual: CounterfactualTrainable) -> None:
        self.scope = scope
        self.counterfactual = counterfactual
        self.module = nn.ModuleDict({"classifier": scope.module, "counterfactual": counterfactual.module})
        self.steps = scope.steps
        self.grad_clip = scope.grad_clip

    def param_groups(self) -> list[dict[str, Any]]:
        return self.scope.param_groups() + self.counterfactual.param_groups()

    def sample(self, rng: random.Random) -> list[EditRequest]:
        return self.scope.sample(rng)

    def loss(self, batch: Sequence[EditRequest]) -> tuple[torch.Tensor, dict[str, float]]:
        scope_loss, logged = self.scope.loss(batch)
        cf_loss, cf_logged = self.counterfactual.loss(batch)
        return scope_loss + cf_loss, {**logged, **cf_logged, "scope_loss": scope_loss.item()}

    def validate(self) -> dict[str, float]:
        return {**self.scope.validate(), **self.counterfactual.validate()}

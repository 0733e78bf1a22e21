"""WISE: a side memory for lifelong editing (Wang et al., NeurIPS 2024, arXiv 2405.14768).

The main memory (the model's value matrix ``W`` of one FFN, e.g. ``down_proj`` of a late
layer) never changes. Edits go to a *side memory*, a float32 copy ``W'`` of ``W``, applied
by a forward hook on that module, so every call of the model sees them.

Knowledge sharding. Edits are written in shards of ``save_freq`` requests. A shard starts
from ``W`` and draws a random gradient mask (each entry kept with probability
``mask_ratio``); each request of the shard trains only the masked entries. The loss per
request is the teacher-forced NLL of ``target_new`` after the prompt, averaged over the
prompt in ``1 + 2·5`` contexts (``"{}"`` and greedy continuations of ``I``, ``You``,
``Because``, ``Yes``, ``Q: `` of 5 and 10 tokens, as the reference), plus the activation
margin loss. With ``d(x) = mean_t ‖act(a_t·W') − act(a_t·W)‖`` over the tokens of input
``x`` (``act``: the model's MLP activation), ``e`` the edit rows and ``u`` one irrelevant
row::

    L_act = [d(u) − d(e) + γ]₊ + [d(u) − α]₊ + [β − d(e)]₊      (each averaged over its positive terms)

The optimiser is SGD (``edit_lr``, weight decay 1e-5) for ``n_iter`` steps, stopping early
once the loss is ≤ 0.02 and moved by ≤ 1e-4; after each step ``W'`` is clipped to
``W ± norm_constraint``. The irrelevant row of edit ``i`` is ``locality_prompt + " " +
locality_answer`` of CounterFact train-split record ``i mod loc_records`` (the reference
takes the ``loc``/``loc_ans`` of ZsRE's train split, one per edit); the edit's own
``locality_prompts`` are never trained on, as evaluation reads them.

Threshold. At the last step of an edit its mean edit-row distance ``d(e)`` is recorded;
the routing threshold is ``act_ratio`` times the smallest recorded value.

Merging. Every ``save_freq`` edits the shard is stored and a fresh one started; every
``merge_freq`` edits the stored shards are TIES-merged (:mod:`editkit.editors.wise_merge`,
``densities``, ``weights``) with ``W`` as the base.

* WISE-Merge (``retrieve: false``): the stored shards merge into one side memory (the
  first merge with weights ``weights/n``; later ones with ``0.4/n`` each and 0.6 for the
  earlier merged memory). At inference a row goes to the candidate (merged memory, a
  stored shard, the current shard) with the largest distance, or to ``W`` if every
  distance is below the threshold (one threshold, the minimum over all edits).
* WISE-Retrieve (``retrieve: true``, the published files): the last
  ``merge_freq/save_freq`` stored shards merge into one memory of a list, each memory with
  its own threshold (the minimum of its edits). A row goes to the current shard if its
  distance passes that shard's threshold, else to ``W``; then to each memory in order
  whose distance exceeds both the best so far and its own threshold.

Checked against EasyEdit ``easyeditor/models/wise/`` (``WISE.py``, ``wise_main.py``,
``wise_hparams.py``, ``merge/gta.py``, ``utils.py``) and ``hparams/WISE/*.yaml``. Defaults
are ``hparams/WISE/llama-7b.yaml``: ``model.layers[27].mlp.down_proj`` (role ``mlp_out``,
layer 27), edit_lr 1.0, n_iter 70, mask_ratio 0.2, act_margin [5, 20, 10] (alpha, beta,
gamma), act_ratio 0.88, norm_constraint 1.0, save_freq 500, merge_freq 1000, ties with
densities 0.53 and weights 1.0, objective only_label, retrieve true, replay false.
Per-model values live in ``editkit/configs/wise.yaml``. Known deviations:

* Routing is per row of a call over its real positions (the attention mask of the call;
  the reference routes a whole call with batch size 1 and averages padding too). A
  continuation run on a key/value cache is judged on its own positions, as the
  reference's step-wise ``generate`` is.
* The side memory and its training are float32 whatever the model's dtype; the
  distances average only real positions; the NLL is the mean over target tokens (the
  reference divides by a count that includes one or two prompt positions).
* The reference merges pending shards on the first *forward* call after ``save_freq``
  edits (WISE-Merge); here forward calls never change state, and stored shards not yet
  merged are routing candidates until ``merge_freq`` merges them.
* Masks are drawn from a generator seeded by ``seed`` and the shard's index (the
  reference: numpy's global state), so a resumed run draws the same masks.
* Not accepted: ``replay`` true (Appendix B.3), ``save_freq`` None, other merge
  algorithms, ``objective_optimization`` other than only_label, chat templates, and
  subject-masked activation losses (the reference uses them only when the
  locality prompt is a substring of the edit prompt, never with CounterFact).
* ``template_lengths`` (the context lengths) and ``loc_records`` are additions.

Each step runs the batch of :mod:`editkit.editors.wise_batch`: the blocks below the side
memory run once per edit, and only the target positions are unembedded (the same loss,
to float rounding: 70 SGD steps at edit_lr 1.0 can still move single entries of the shard
apart, with the same final losses; 32.5 against 107 s per edit on SmolLM2, measured in
one CPU thread beside two other runs).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F

from ..config import Params
from ..editing import EditCollapseError, EditHandle, Editor
from ..hooks import attach_forward_hook, attach_forward_pre_hook, get_module
from ..losses import target_nll
from ..tokens import encode, encode_pair, target_text
from ..types import EditRequest
from .wise_batch import TrainingBatch, gathered_logits_match, target_logits, training_batch
from .wise_merge import SideMemory, row_distance, ties_merge

if TYPE_CHECKING:
    from ..models import LoadedModel

__all__ = ["WISE", "WISEParams", "SideMemory"]  # SideMemory: from wise_merge

log = logging.getLogger(__name__)

_STARTS = ("I", "You", "Because", "Yes", "Q: ")  # the reference's context-template starts
_WEIGHT_DECAY = 1e-5  # the reference's SGD weight decay
_STOP_LOSS, _STOP_DELTA = 0.02, 1e-4  # the reference's early stop (EarlyStopMeter)


@dataclass(frozen=True)
class WISEParams(Params):
    """WISE hyperparameters (the reference's names; ``act_margin`` is ``alpha``, ``beta``, ``gamma``;
    ``layers`` + ``role`` replace ``inner_params``)."""

    layers: tuple[int, ...] = (27,)
    role: Literal["mlp_out", "mlp_in"] = "mlp_out"
    edit_lr: float = 1.0
    n_iter: int = 70
    mask_ratio: float = 0.2
    alpha: float = 5.0
    beta: float = 20.0
    gamma: float = 10.0
    act_ratio: float = 0.88
    norm_constraint: float = 1.0
    save_freq: int = 500
    merge_freq: int = 1000
    merge_alg: Literal["ties"] = "ties"
    densities: float = 0.53
    weights: float = 1.0
    retrieve: bool = True
    replay: bool = False
    objective_optimization: Literal["only_label"] = "only_label"
    template_lengths: tuple[int, ...] = (5, 10)
    loc_records: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.layers) != 1:
            raise ValueError(f"WISE keeps a side memory of exactly one layer, got layers={self.layers}")
        if self.n_iter < 1 or self.edit_lr <= 0:
            raise ValueError(f"n_iter and edit_lr must be positive, got n_iter={self.n_iter}, edit_lr={self.edit_lr}")
        if not 0 < self.mask_ratio <= 1:
            raise ValueError(f"mask_ratio must be in (0, 1], got {self.mask_ratio}")
        if not 0 < self.densities <= 1:
            raise ValueError(f"densities must be in (0, 1], got {self.densities}")
        if min(self.alpha, self.beta, self.gamma) < 0 or self.act_ratio <= 0 or self.norm_constraint <= 0:
            raise ValueError("alpha, beta and gamma must be >= 0; act_ratio and norm_constraint positive")
        if self.save_freq < 1 or self.merge_freq < 1 or self.merge_freq % self.save_freq:
            raise ValueError(f"merge_freq must be a positive multiple of save_freq, got merge_freq="
                             f"{self.merge_freq}, save_freq={self.save_freq}")
        if self.replay:
            raise ValueError("replay=True (the reference's Appendix B.3 replay) is not implemented")
        if self.loc_records < 1 or any(n < 1 for n in self.template_lengths):
            raise ValueError("loc_records and every template length must be positive")


class WISE(Editor):
    """Side memory of one value matrix, installed as a forward hook once something is edited."""

    name = "wise"
    params_class = WISEParams

    def __init__(self, lm: LoadedModel, params: WISEParams) -> None:
        super().__init__(lm, params)
        self.layer = params.layers[0]
        if not 0 <= self.layer < lm.n_layers:
            raise ValueError(f"WISE layer {self.layer} is out of range for {lm.name} ({lm.n_layers} layers)")
        self.module_path = lm.adapter.path(params.role, self.layer)
        module = get_module(lm.model, self.module_path)
        self._main = lm.adapter.as_out_in(module.weight).detach().float()  # W, read at every call
        bias = getattr(module, "bias", None)
        self._bias = None if bias is None else bias.detach().float()
        config = lm.model.config
        from transformers.activations import ACT2FN
        names = [getattr(config, key, None) for key in ("hidden_act", "hidden_activation", "activation_function")]
        if not any(names):
            raise ValueError(f"WISE needs the MLP activation of {lm.name}; its config names none "
                             "(hidden_act, hidden_activation or activation_function)")
        self._act = ACT2FN[next(name for name in names if name)]
        self.memory = SideMemory()
        self.templates: list[str] | None = None
        self._loc_pool: list[str] | None = None
        self._hooks: list[Any] = []
        self._real: torch.Tensor | None = None  # attention mask of the call in progress
        self._live: torch.Tensor | None = None  # the shard being trained
        self._seen: tuple[torch.Tensor, torch.Tensor] | None = None  # (main, side) outputs while training
        self._gathered: bool | None = None  # whether only the target positions are unembedded (wise_batch)

    # -- the adaptor --------------------------------------------------------------
    def _sync_hook(self) -> None:
        wanted = bool(self.memory.n_edits) or self._live is not None
        if wanted and not self._hooks:
            self._hooks = [attach_forward_pre_hook(self.lm.model, "", self._note_mask, with_kwargs=True),
                           attach_forward_hook(self.lm.model, "", self._forget_mask),
                           attach_forward_hook(self.lm.model, self.module_path, self._adapt)]
        elif not wanted and self._hooks:
            for hook in self._hooks:
                hook.remove()
            self._hooks = []

    def _note_mask(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self._real = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _forget_mask(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        self._real = None

    def _side(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), weight, self._bias)

    def _adapt(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        main, x = (output[0] if isinstance(output, tuple) else output), args[0]
        if self._live is not None:  # training: the live shard everywhere, outputs kept for the losses
            side = self._side(x, self._live)
            self._seen = (main.detach().float(), side)
            return side.to(main.dtype)
        rows = main.reshape(-1, main.shape[-2], main.shape[-1]) if main.dim() > 2 else main[None]
        real = torch.ones(rows.shape[:2], dtype=torch.bool, device=main.device)
        mask = self._real
        if mask is not None and main.dim() == 2 and mask.numel() == real.numel():  # (batch·positions) x width
            real = mask.reshape(real.shape).bool()
        elif mask is not None and mask.shape[0] == real.shape[0] and mask.shape[1] >= real.shape[1]:
            real = mask[:, -real.shape[1]:].bool()  # the call's own positions (a cache holds the rest)
        outputs, choice = self._route(x.reshape(*rows.shape[:2], -1), rows, real)
        if not (choice >= 0).any():
            return None
        routed = rows
        for k, side in enumerate(outputs):
            routed = torch.where((choice == k)[:, None, None], side.to(main.dtype), routed)
        routed = routed.reshape(main.shape)
        return (routed, *output[1:]) if isinstance(output, tuple) else routed

    def _route(self, x: torch.Tensor, main: torch.Tensor, real: torch.Tensor
               ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Candidate side outputs and, per row, the index of the one chosen (-1: the main memory)."""
        mem, ratio = self.memory, self.params.act_ratio
        shard = [mem.shard] if mem.shard is not None and mem.shard_edits else []
        if self.params.retrieve:
            weights, limits = shard + mem.memories, [mem.act_min * ratio] * len(shard) + [
                a * ratio for a in mem.memory_acts]
        else:
            weights = shard + mem.memories + ([mem.merged] if mem.merged is not None else [])
            limits = [mem.act_min * ratio] * len(weights)
        outputs = [self._side(x, w) for w in weights]
        choice = torch.full(real.shape[:1], -1, dtype=torch.long, device=main.device)
        if not outputs:
            return outputs, choice
        dist = torch.stack([row_distance(main, out, self._act, real, infer=True) for out in outputs])
        limit = torch.tensor(limits, device=dist.device)[:, None]
        if not self.params.retrieve:  # the largest distance, if any passes the threshold
            best = dist.argmax(0)
            return outputs, torch.where((dist >= limit).any(0), best, choice)
        best = dist[0] if shard else torch.zeros_like(dist[0])
        if shard:
            choice = torch.where(dist[0] >= limit[0], 0, choice)
        for k in range(len(shard), len(outputs)):
            take = (dist[k] > best) & (dist[k] > limit[k])
            choice, best = torch.where(take, k, choice), torch.where(take, dist[k], best)
        return outputs, choice

    # -- state ----------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the side memory (shards, memories, thresholds, counters) and remove the hooks."""
        self.memory = SideMemory()
        self._sync_hook()

    def state_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "role": self.params.role, "templates": self.templates,
                "memory": self.memory.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the side memory with a saved one (an empty mapping empties it)."""
        if not state:
            self.reset()
            return
        if state.get("layer") != self.layer or state.get("role") != self.params.role:
            raise ValueError(f"WISE state is for {state.get('role')} at layer {state.get('layer')}, "
                             f"this editor edits {self.params.role} at layer {self.layer}")
        self.templates = None if state.get("templates") is None else list(state["templates"])
        self.memory = SideMemory.from_state(state["memory"], self.lm.device)
        self._sync_hook()

    def _undo(self, live: SideMemory, before: SideMemory) -> None:
        if live is not self.memory:  # reset or replaced since: nothing to undo
            return
        for f in dataclasses.fields(before):
            setattr(live, f.name, getattr(before, f.name))
        self._sync_hook()

    # -- inputs -------------------------------------------------------------------------
    def context_templates(self) -> list[str]:
        """``"{}"`` and greedy continuations of the reference's five starts (computed once, unedited)."""
        if self.templates is None:
            lm, hooks, self._hooks = self.lm, self._hooks, []
            for hook in hooks:  # generate from the unedited model
                hook.remove()
            try:
                self.templates = ["{}"]
                for length in self.params.template_lengths:
                    for start in _STARTS:
                        ids = torch.tensor([encode(lm.tokenizer, start)], device=lm.device)
                        with torch.no_grad():
                            out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                                    max_new_tokens=length, do_sample=False,
                                                    pad_token_id=lm.tokenizer.eos_token_id)
                        text = lm.tokenizer.decode(out[0], skip_special_tokens=True)
                        self.templates.append(text.replace("{", " ").replace("}", " ") + " {}")
            finally:
                self._sync_hook()
        return self.templates

    def loc_text(self, index: int) -> str:
        """The irrelevant input of edit ``index``: a CounterFact train record's locality prompt and answer."""
        if self._loc_pool is None:
            from ..datasets import load_counterfact
            records = load_counterfact("train", self.params.loc_records)
            self._loc_pool = [f"{r.locality_prompts[0]} {r.locality_answers[0]}".strip() if r.locality_prompts
                              else r.prompt for r in records]
        return self._loc_pool[index % len(self._loc_pool)]

    # -- the edit -------------------------------------------------------------------------
    def _apply(self, requests: list[EditRequest], handle: EditHandle) -> None:
        for request in requests:  # one after another, as the reference's sequential editing
            live = self.memory
            handle.add_undo(lambda live=live, before=live.snapshot(): self._undo(live, before))
            handle.info.append(self._apply_one(request))

    def _batch(self, request: EditRequest) -> TrainingBatch:
        """The edit rows (the prompt in every context, then ``target_new``) and the irrelevant row
        (:mod:`editkit.editors.wise_batch`: what the steps repeat is computed once)."""
        tok, rows, queries, targets, groups = self.lm.tokenizer, [], [], [], []
        for r, template in enumerate(self.context_templates()):
            context, target = encode_pair(tok, template.format(request.prompt), target_text(request.target_new))
            rows.append(context + target)
            queries += [(r, len(context) - 1 + j) for j in range(len(target))]
            targets += target
            groups += [r] * len(target)
        rows.append(encode(tok, self.loc_text(self.memory.n_edits)))
        return training_batch(self.lm, self.layer, rows, queries, targets, groups)

    def _losses(self, batch: TrainingBatch) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(target NLL, activation loss, mean edit-row distance) with the live shard."""
        p, real, n = self.params, batch.real, batch.real.shape[0] - 1
        if self._gathered is None:  # checked once, on the first batch
            self._gathered = gathered_logits_match(self.lm, batch)
        logits = target_logits(self.lm, batch, self._gathered)
        nll = target_nll(logits, batch.targets, torch.arange(len(batch.targets), device=real.device), batch.groups,
                         n).mean()
        main, side = self._seen
        dist = row_distance(main, side, self._act, real)
        inside, outside = dist[:n], dist[n:]

        def hinge(values: torch.Tensor) -> torch.Tensor:
            positive = values[values > 0]
            return positive.mean() if positive.numel() else values.new_zeros(())

        act = hinge(outside[:, None] - inside[None] + p.gamma) + hinge(outside - p.alpha) + hinge(p.beta - inside)
        return nll, act, float(inside.detach().mean())

    def _apply_one(self, request: EditRequest) -> dict[str, Any]:
        p, mem = self.params, self.memory
        if mem.n_edits % p.save_freq == 0 or mem.mask is None:  # a new shard: a new random mask
            generator = torch.Generator().manual_seed(p.seed * 1_000_003 + mem.n_edits // p.save_freq)
            mem.mask = (torch.rand(self._main.shape, generator=generator) < p.mask_ratio).to(self._main.device)
        batch = self._batch(request)
        start = self._main if mem.shard is None else mem.shard
        shard = torch.nn.Parameter(start.clone())
        optimizer = torch.optim.SGD([shard], lr=p.edit_lr, weight_decay=_WEIGHT_DECAY)
        losses: list[float] = []
        recorded = None
        self._live = shard
        self._sync_hook()
        try:
            with torch.enable_grad():
                for step in range(p.n_iter):
                    nll, act, inside = self._losses(batch)
                    loss = nll + act
                    stop = len(losses) > 1 and abs(losses[-1] - losses[-2]) <= _STOP_DELTA and losses[-1] <= _STOP_LOSS
                    if stop or step == p.n_iter - 1:
                        recorded = inside
                    if stop:
                        break
                    optimizer.zero_grad()
                    loss.backward()
                    shard.grad.mul_(mem.mask)
                    optimizer.step()
                    losses.append(loss.item())
                    with torch.no_grad():  # clip to W ± norm_constraint
                        shard.copy_(torch.maximum(torch.minimum(shard, self._main + p.norm_constraint),
                                                  self._main - p.norm_constraint))
        finally:
            self._live, self._seen = None, None
            self._sync_hook()
        if not torch.isfinite(shard).all() or not math.isfinite(recorded):
            raise EditCollapseError(f"wise: the side memory trained for {request.case_id!r} is not finite")
        mem.shard, mem.shard_edits, mem.n_edits = shard.detach(), mem.shard_edits + 1, mem.n_edits + 1
        mem.act_min = min(mem.act_min, recorded)
        if mem.n_edits % p.save_freq == 0:
            self._store_shard()
        if mem.n_edits % p.merge_freq == 0:
            self._merge()
        self._sync_hook()
        log.debug("wise: edit %d (%r): loss %.3f -> %.3f, distance %.3f", mem.n_edits, request.case_id,
                  losses[0] if losses else float("nan"), losses[-1] if losses else float("nan"), recorded)
        return {"case_id": request.case_id, "losses": tuple(losses), "distance": recorded,
                "threshold": mem.act_min * p.act_ratio, "n_edits": mem.n_edits, "n_merges": mem.n_merges}

    def _store_shard(self) -> None:
        mem = self.memory
        mem.memories = [*mem.memories, self._main.clone() if mem.shard is None else mem.shard]
        mem.shard, mem.shard_edits = None, 0
        if self.params.retrieve:
            mem.memory_acts, mem.act_min = [*mem.memory_acts, mem.act_min], math.inf

    def _merge(self) -> None:
        p, mem = self.params, self.memory
        if p.retrieve:
            k = p.merge_freq // p.save_freq
            merged = ties_merge(self._main, mem.memories[-k:], [p.weights / k] * k, p.densities)
            mem.memories = [*mem.memories[:-k], merged]
            mem.memory_acts = [*mem.memory_acts[:-k], min(mem.memory_acts[-k:])]
        else:
            n = len(mem.memories)
            if mem.merged is None:
                mem.merged = ties_merge(self._main, mem.memories, [p.weights / n] * n, p.densities)
            else:
                mem.merged = ties_merge(self._main, [*mem.memories, mem.merged], [0.4 / n] * n + [0.6], p.densities)
            mem.memories = []
        mem.n_merges += 1

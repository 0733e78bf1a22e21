"""FT-L: constrained fine-tuning of one layer (Zhu et al., 2020, arXiv 2012.00363).

"Modifying Memories in Transformer Models" fine-tunes a chosen set of weights on the
new facts while keeping them within a small L∞ ball around their original values;
ROME (arXiv 2202.05262) and MEMIT (arXiv 2210.07229) use it as the FT-L baseline on
the MLP output projection of one layer. For the parameters θ of that projection
(its weight and, where the module has one, its bias):

    θ ← Adam step on  L(θ) = mean over requests of
                            − 1/|y| Σ_j log p_θ(y_j | context_j)        (+ weight_decay·θ in Adam)
    θ ← clip(θ, θ₀ − ε, θ₀ + ε)  elementwise after every step, ε = ``norm_constraint``

for ``num_steps`` epochs over the requests in chunks of ``batch_size``. A chunk whose
loss is below ``early_stop_loss`` takes no step, and the loop stops once an epoch's
mean loss is below it. The edit is the difference θ − θ₀, added to the model
through :meth:`Editor._update_weight` so that ``restore()`` is exact.

Two objectives, as EasyEdit's ``objective_optimization``:

* ``prompt_last`` (ROME's FT-L, the default): every target token is scored at the
  prompt's last position, ``context_j`` = the prompt for all ``j``. EasyEdit's
  survey calls this FT-L.
* ``target_new``: teacher-forced NLL of the target tokens, the prompt masked out,
  ``context_j`` = prompt + y_<j (EasyEdit's FT-M).

Checked against kmeng01/rome ``baselines/ft/ft_main.py`` and ``ft_hparams.py``, and
EasyEdit ``easyeditor/models/ft/ft_main.py`` with ``hparams/FT/*`` (ROME's
``gpt2-xl_constr.json`` and ``EleutherAI_gpt-j-6B_constr.json`` are the FT-L
settings of the ROME paper). Known deviations:

* Target tokens are the continuation ids of prompt + " target" (lm-eval's split,
  :func:`editkit.tokens.encode_pair`). The references tokenise the target alone,
  so Llama-style tokenizers put a BOS token among the "targets" of ``prompt_last``
  and padding is masked only where it equals ``unk``.
* Logits are computed only at the positions the loss reads (a pre-hook on the
  unembedding selects them, :func:`editkit.hooks.inputs_only_at`); the loss
  (:func:`editkit.losses.target_nll`) is the same.
* ``kl_factor`` is declared by both references but never used; it is accepted for
  config compatibility and must be 0.
* The references' ``norm_constraint: false`` (unconstrained FT) is written ``null``.

Defaults are the ROME paper's GPT2-XL FT-L values (layer 0, lr 5e-4, 25 steps,
ε = 5e-4, no weight decay, batch 128). Per-model values live in
``editkit/configs/ft.yaml``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from ..config import Params
from ..editing import EditHandle, Editor
from ..hooks import inputs_only_at
from ..losses import target_nll
from ..tokens import encode_pair, pad_batch, target_text
from ..types import EditRequest

if TYPE_CHECKING:
    from ..models import LoadedModel

__all__ = ["FT", "FTParams"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FTParams(Params):
    """FT-L hyperparameters (names as in the references' FT hparams files)."""

    layers: tuple[int, ...] = (0,)
    num_steps: int = 25
    lr: float = 5e-4
    weight_decay: float = 0.0
    # Declared by kmeng01/rome and EasyEdit but unused there; must stay 0.
    kl_factor: float = 0.0
    # L∞ radius around the original weights; None = unconstrained fine-tuning.
    norm_constraint: float | None = 5e-4
    batch_size: int = 128
    objective_optimization: Literal["prompt_last", "target_new"] = "prompt_last"
    # Both references: skip the step for a chunk, and stop, below this loss.
    early_stop_loss: float = 1e-2

    def __post_init__(self) -> None:
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"FT needs one or more distinct layers, got layers={self.layers}")
        if self.num_steps < 1 or self.lr <= 0 or self.batch_size < 1:
            raise ValueError("num_steps, lr and batch_size must be positive")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.norm_constraint is not None and self.norm_constraint <= 0:
            raise ValueError(f"norm_constraint must be positive or None, got {self.norm_constraint}")
        if self.kl_factor != 0:
            raise ValueError("kl_factor is not implemented for FT (the references never use it); set it to 0")
        if self.objective_optimization not in ("prompt_last", "target_new"):
            raise ValueError(f"objective_optimization must be 'prompt_last' or 'target_new', "
                             f"got {self.objective_optimization!r}")


@dataclass(frozen=True)
class _Chunk:
    """Token ids of a chunk of requests and where the loss reads the logits."""

    ids: torch.Tensor            # (batch, width), right-padded
    mask: torch.Tensor           # (batch, width)
    query_rows: torch.Tensor     # (queries,) row of each logit the loss needs
    query_positions: torch.Tensor
    target_query: torch.Tensor   # (targets,) index into the queries
    target_tokens: torch.Tensor  # (targets,)
    target_rows: torch.Tensor    # (targets,) request of each target token


class FT(Editor):
    """Fine-tune the MLP output projection of ``layers`` under an L∞ constraint."""

    name = "ft"
    batch_edits = True
    params_class = FTParams

    def __init__(self, lm: LoadedModel, params: FTParams) -> None:
        super().__init__(lm, params)
        for layer in params.layers:
            if not 0 <= layer < lm.n_layers:
                raise ValueError(f"FT layer {layer} is out of range for {lm.name} ({lm.n_layers} layers)")
        # Every parameter of the projection (weight, and bias where present), as the
        # references' substring match on rewrite_module_tmp selects.
        self.parameter_paths = [
            f"{lm.adapter.path('mlp_out', layer)}.{name}"
            for layer in params.layers
            for name, _ in lm.adapter.module(lm.model, "mlp_out", layer).named_parameters(recurse=False)
        ]

    # -- inputs ---------------------------------------------------------------
    def _chunk(self, requests: Sequence[EditRequest]) -> _Chunk:
        tokenizer, device = self.lm.tokenizer, self.lm.device
        sequences, queries, targets = [], [], []
        for row, request in enumerate(requests):
            context, target = encode_pair(tokenizer, request.prompt, target_text(request.target_new))
            if not target:
                raise ValueError(f"target_new {request.target_new!r} of request {request.case_id!r} has no tokens")
            last = len(context) - 1
            if self.params.objective_optimization == "prompt_last":
                sequences.append(context)
                targets += [(row, len(queries), token) for token in target]
                queries.append((row, last))
            else:  # logits at last + j predict target token j (teacher forcing)
                sequences.append(context + target[:-1])
                for j, token in enumerate(target):
                    targets.append((row, len(queries), token))
                    queries.append((row, last + j))
        ids, mask = pad_batch(sequences, tokenizer.pad_token_id)

        def tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, device=device, dtype=torch.long)

        return _Chunk(
            ids=tensor(ids), mask=tensor(mask),
            query_rows=tensor([r for r, _ in queries]), query_positions=tensor([p for _, p in queries]),
            target_query=tensor([q for _, q, _ in targets]), target_tokens=tensor([t for _, _, t in targets]),
            target_rows=tensor([r for r, _, _ in targets]),
        )

    def _loss(self, chunk: _Chunk) -> torch.Tensor:
        """Mean over requests of the mean target-token NLL."""
        unembed = self.lm.adapter.path("unembed")
        with inputs_only_at(self.lm.model, unembed, chunk.query_rows, chunk.query_positions):
            logits = self.lm.model(input_ids=chunk.ids, attention_mask=chunk.mask, use_cache=False).logits[0]
        return target_nll(logits, chunk.target_tokens, chunk.target_query, chunk.target_rows,
                          n_groups=chunk.ids.shape[0]).mean()

    # -- the edit -------------------------------------------------------------
    def _apply(self, requests: list[EditRequest], handle: EditHandle) -> None:
        p = self.params
        chunks = [self._chunk(requests[i:i + p.batch_size]) for i in range(0, len(requests), p.batch_size)]
        sizes = [min(p.batch_size, len(requests) - i) for i in range(0, len(requests), p.batch_size)]
        parameters = {path: self.lm.model.get_parameter(path) for path in self.parameter_paths}
        originals = {path: w.detach().clone() for path, w in parameters.items()}
        flags = {path: w.requires_grad for path, w in parameters.items()}
        # Adam steps float32 master copies (the model's own weights when it is float32): in
        # float16 Adam's eps and second moments underflow. The model's weights get each
        # step's master values rounded to their dtype, and the gradient is read from them.
        half = {path: w.dtype not in (torch.float32, torch.float64) for path, w in parameters.items()}
        masters = {path: w.detach().float().clone() if half[path] else w for path, w in parameters.items()}
        bounds = None
        if p.norm_constraint is not None:
            bounds = {path: (masters[path].detach() - p.norm_constraint, masters[path].detach() + p.norm_constraint)
                      for path in parameters}
        losses: list[float] = []
        try:
            for path, w in parameters.items():
                w.requires_grad_(True)  # only these get gradients; the model stays frozen
                masters[path].requires_grad_(True)
            optimizer = torch.optim.Adam(list(masters.values()), lr=p.lr, weight_decay=p.weight_decay)
            with torch.enable_grad():
                for _ in range(p.num_steps):
                    epoch = 0.0
                    for chunk, size in zip(chunks, sizes):
                        optimizer.zero_grad(set_to_none=True)
                        loss = self._loss(chunk)
                        epoch += loss.item() * size
                        if loss.item() >= p.early_stop_loss:
                            loss.backward()
                            for path, w in parameters.items():
                                if half[path]:
                                    masters[path].grad = w.grad.float()
                                    w.grad = None
                            optimizer.step()
                        with torch.no_grad():
                            for path, w in parameters.items():
                                if bounds is not None:
                                    masters[path].clamp_(*bounds[path])
                                if half[path]:
                                    w.copy_(masters[path])
                    losses.append(epoch / len(requests))
                    if losses[-1] < p.early_stop_loss:
                        break
            deltas = {path: (masters[path].detach() - originals[path].float()) for path in parameters}
        finally:
            with torch.no_grad():
                for path, w in parameters.items():
                    w.copy_(originals[path])
                    w.requires_grad_(flags[path])
                    w.grad = None
        for path, delta in deltas.items():  # deltas are in stored orientation already
            self._update_weight(handle, path, delta)
        summary = {
            "losses": tuple(losses),
            "delta_norm": float(torch.sqrt(sum(d.double().pow(2).sum() for d in deltas.values()))),
            "max_abs_delta": max(float(d.abs().max()) for d in deltas.values()),
        }
        log.debug("FT on %d request(s): loss %.4f -> %.4f", len(requests), losses[0], losses[-1])
        handle.info.extend({"case_id": r.case_id, **summary} for r in requests)

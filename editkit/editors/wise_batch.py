"""WISE's training batch (:mod:`editkit.editors.wise`): run at every step, with two savings that keep the maths.

* The side memory changes only its own block and those above, so the blocks below run once
  per edit: :class:`~editkit.prefix_cache.PrefixCachedBatch` with no cached prefix returns
  their recorded output from the second step on (the same logits, bit for bit). A model
  that cannot be run that way runs the full batch at every step.
* The loss reads the logits at the target tokens only (about 20 of some 300 positions on
  SmolLM2), so only those final hidden states are unembedded: the model is asked for one
  position's logits, and the hidden states at the targets go through its output embedding.
  On a 135M model the unembedding was half of each step. :func:`gathered_logits_match`
  checks this once per editor against the full logits; a model where they differ (a logit
  soft-cap or scale after the output embedding) is run with full logits.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..hooks import forward_hooks
from ..prefix_cache import PrefixCachedBatch, SplitUnsupported
from ..tokens import pad_batch

if TYPE_CHECKING:
    from ..models import LoadedModel

__all__ = ["TrainingBatch", "training_batch", "target_logits", "gathered_logits_match"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingBatch:
    """Right-padded rows, the callable that runs them and where the targets are.

    ``run(positions)`` returns the logits at those sequence positions of every row (None:
    all); ``queries`` are flat ``row * width + position`` indices of the target tokens.
    """

    run: Callable[[torch.Tensor | None], torch.Tensor]
    real: torch.Tensor
    queries: torch.Tensor
    targets: torch.Tensor
    groups: torch.Tensor


def training_batch(lm: LoadedModel, first_block: int, rows: list[list[int]], queries: list[tuple[int, int]],
                   targets: list[int], groups: list[int]) -> TrainingBatch:
    """The batch of ``rows`` (token ids), whose blocks below ``first_block`` never change between steps."""
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids, mask = pad_batch(rows, pad)
    device = lm.device
    ids, mask = torch.tensor(ids, device=device), torch.tensor(mask, device=device, dtype=torch.bool)
    try:
        run: Any = PrefixCachedBatch(lm.model, rows, [0] * len(rows), pad, blocks=lm.adapter.blocks,
                                     first_block=first_block)
    except SplitUnsupported as why:
        log.debug("wise: every block runs at every step: %s", why)
        keeps = "logits_to_keep" in inspect.signature(lm.model.forward).parameters

        def run(positions: torch.Tensor | None) -> torch.Tensor:
            extra = {"logits_to_keep": positions} if keeps and positions is not None else {}
            logits = lm.model(input_ids=ids, attention_mask=mask.long(), use_cache=False, **extra).logits
            return logits if extra or positions is None else logits[:, positions]

    return TrainingBatch(run, mask, torch.tensor([r * ids.shape[1] + p for r, p in queries], device=device),
                         torch.tensor(targets, device=device), torch.tensor(groups, device=device))


def target_logits(lm: LoadedModel, batch: TrainingBatch, gathered: bool) -> torch.Tensor:
    """The logits at ``batch.queries`` (one row per target token); ``gathered``: unembed only those."""
    if not gathered:
        logits = batch.run(None)
        return logits.reshape(-1, logits.shape[-1])[batch.queries]
    model = lm.model
    seen: dict[str, torch.Tensor] = {}

    def keep(module: torch.nn.Module, args: tuple, output: Any) -> None:
        seen["hidden"] = output[0]  # the base model's last hidden state (after its final norm)

    one = torch.zeros(1, dtype=torch.long, device=lm.device)
    with forward_hooks(model, [(model.base_model_prefix, keep)]):
        batch.run(one)  # the logits of one position: the unembedding is not the cost
    hidden = seen["hidden"]
    return model.get_output_embeddings()(hidden.reshape(-1, hidden.shape[-1])[batch.queries])


def gathered_logits_match(lm: LoadedModel, batch: TrainingBatch) -> bool:
    """Whether unembedding the target hidden states gives the model's own logits there (to float rounding)."""
    model = lm.model
    if (getattr(model, "base_model_prefix", "") not in dict(model.named_children())
            or model.get_output_embeddings() is None
            or "logits_to_keep" not in inspect.signature(model.forward).parameters):
        return False
    with torch.no_grad():
        full = target_logits(lm, batch, gathered=False)
        try:
            mine = target_logits(lm, batch, gathered=True)
        except (KeyError, TypeError, IndexError, RuntimeError) as why:
            log.debug("wise: the full logits are read at every step: %s", why)
            return False
    same = mine.shape == full.shape and torch.allclose(mine.float(), full.float(), rtol=1e-4, atol=1e-4)
    if not same:
        log.info("wise: %s's logits are not its output embedding of the last hidden state; "
                 "the full logits are computed at every step", lm.name)
    return same

"""Shared locate-then-edit math: context templates, subject keys, target values.

Used by ROME now and by MEMIT, PMET and AlphaEdit (which differ in where the
target value lives and how the update is solved, not in these steps).

Conventions: a *template prefix* is text placed before the edit prompt ("" for
the bare prompt). Keys are the inputs of the MLP output projection at the
subject's last token; values are the output of a hooked module at that token.
"""

from __future__ import annotations

import inspect
import logging
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .corpus import sample_texts
from .hooks import by_position, capture, forward_hooks
from .losses import target_nll
from .prefix_cache import PrefixCachedBatch, SplitUnsupported, logits_at
from .tokens import encode, encode_pair, pad_batch, subject_last_token, target_text
from .types import EditRequest

if TYPE_CHECKING:
    from .models import LoadedModel

__all__ = [
    "context_templates", "subject_keys", "module_io_at_subject", "optimize_target_value", "optimize_target_values",
    "TargetValue",
]

log = logging.getLogger(__name__)


def context_templates(lm: LoadedModel, length_params: Sequence[Sequence[int]], seed: int) -> list[str]:
    """ROME's context prefixes: ``""`` plus short texts sampled from the model.

    For each ``(length, count)`` pair, ``count`` texts of ``length - 1`` new tokens
    are sampled (ROME's ``max_out_len`` counts the start token) with top-k 5. Braces
    are blanked and ``". "`` appended, as in the reference. Special tokens are not
    kept in the text (the reference keeps GPT-2's ``<|endoftext|>``; with chat
    models that would put chat markers inside every prompt).
    """
    prefixes = [""]
    for index, (length, count) in enumerate(length_params):
        for text in sample_texts(lm, count, max(length - 1, 1), seed=seed + index):
            text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
            prefixes.append(text.replace("{", " ").replace("}", " ").strip() + ". ")
    return prefixes


def _batch(lm: LoadedModel, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    pad = lm.tokenizer.pad_token_id
    ids, mask = pad_batch(sequences, pad)
    return (torch.tensor(ids, device=lm.device), torch.tensor(mask, device=lm.device))


def subject_keys(lm: LoadedModel, module_path: str, prefixes: Sequence[str], prompt: str, subject: str) -> torch.Tensor:
    """Inputs of ``module_path`` at the subject's last token, one row per prefix (float32 in any model dtype)."""
    texts, positions = zip(*(subject_last_token(lm.tokenizer, p, prompt, subject) for p in prefixes))
    ids, mask = _batch(lm, [encode(lm.tokenizer, t) for t in texts])
    with torch.no_grad(), capture(lm.model, [module_path], outputs=False) as store:
        lm.model(input_ids=ids, attention_mask=mask)
    keys = by_position(store[module_path][0], len(positions))
    return keys[torch.arange(len(positions)), torch.tensor(positions)].detach().float()


def module_io_at_subject(lm: LoadedModel, module_path: str, prompt: str, subject: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, output) of ``module_path`` at the subject's last token of ``prompt`` (float32)."""
    text, position = subject_last_token(lm.tokenizer, "", prompt, subject)
    ids = torch.tensor([encode(lm.tokenizer, text)], device=lm.device)
    with torch.no_grad(), capture(lm.model, [module_path]) as store:
        lm.model(input_ids=ids)
    key, value = (by_position(t, 1) for t in store[module_path])
    return key[0, position].detach().float(), value[0, position].detach().float()


@dataclass(frozen=True)
class TargetValue:
    """Result of :func:`optimize_target_value` for one hooked module."""

    value: torch.Tensor      # v* = initial value + delta (float32)
    initial: torch.Tensor    # the hooked module's output before the edit (float32)
    losses: tuple[float, ...]


def optimize_target_value(lm: LoadedModel, request: EditRequest, hook_path: str, prefixes: Sequence[str],
                          **options: Any) -> TargetValue:
    """:func:`optimize_target_values` for a single hooked module (ROME's v*, MEMIT's z)."""
    return optimize_target_values(lm, request, [hook_path], prefixes, **options)[hook_path]


def _first_block(lm: LoadedModel, paths: Sequence[str]) -> int:
    """The lowest block index that contains one of ``paths`` (0 when one is outside the blocks)."""
    prefix = lm.adapter.blocks + "."
    indices = []
    for path in paths:
        head = path[len(prefix):].split(".")[0] if path.startswith(prefix) else ""
        if not head.isdigit():
            return 0
        indices.append(int(head))
    return min(indices)


def _batch_runner(lm: LoadedModel, sequences: list[list[int]], lookups: list[int], hook_paths: Sequence[str],
                  split_prefix: bool) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[int]]:
    """``(forward, offsets)``: ``forward(positions)`` gives logits at those positions of every row, in a
    layout where row ``r``'s token ``i`` sits at ``i - offsets[r]``."""
    if split_prefix:
        try:
            split = PrefixCachedBatch(lm.model, sequences, lookups, lm.tokenizer.pad_token_id,
                                      blocks=lm.adapter.blocks,
                                      first_block=_first_block(lm, hook_paths))
            return split, lookups
        except SplitUnsupported as why:
            log.debug("target optimisation runs the full batch at every step: %s", why)
    ids, mask = _batch(lm, sequences)
    keeps = "logits_to_keep" in inspect.signature(lm.model.forward).parameters

    def forward(positions: torch.Tensor) -> torch.Tensor:
        return logits_at(lm.model, positions, keeps, input_ids=ids, attention_mask=mask)

    return forward, [0] * len(sequences)


def _target_on_top(target_logits: torch.Tensor, target_tok: torch.Tensor) -> bool:
    """Whether the target is the most probable token at every target position."""
    with torch.no_grad():
        log_probs = torch.log_softmax(target_logits, dim=-1)
        return bool((log_probs.gather(1, target_tok[:, None])[:, 0] >= log_probs.max(-1).values).all())


def optimize_target_values(
    lm: LoadedModel,
    request: EditRequest,
    hook_paths: Sequence[str],
    prefixes: Sequence[str],
    *,
    v_lr: float,
    v_num_grad_steps: int,
    v_weight_decay: float,
    clamp_norm_factor: float,
    kl_factor: float,
    nll_loss_factor: float = 1.0,
    adaptive_nll: bool = False,
    early_stop_loss: float = 5e-2,
    prob_cutoff: float = 0.0,
    kl_prompts: Sequence[str] = ("{} is a",),
    split_prefix: bool = True,
) -> dict[str, TargetValue]:
    """Find outputs of the ``hook_paths`` modules at the subject that make the model say the target.

    One vector ``delta_m`` per module is added to that module's output at the
    subject's last token of every prompt, and all are optimised together with
    Adam on

        nll_loss_factor * NLL(target | prefix + prompt), averaged over prefixes and target tokens
        + kl_factor * KL(p_delta || p_0) of the next token after the subject in "{subject} is a"
        + v_weight_decay * sum_m |delta_m| / |v0_m|^2,

    stopping early below ``early_stop_loss``. After every step each ``delta_m`` is
    clamped to ``clamp_norm_factor * |v0_m|``. With one module this is ROME's
    ``compute_v`` (MEMIT's ``compute_z`` when the module is a block). PMET hooks the
    attention and MLP outputs together and sets ``adaptive_nll``: once the target
    is the argmax at every target position the NLL weight drops to a tenth, and the
    loop stops when the KL term is also below 0.01 (PMET's ``compute_zs``).

    ``prob_cutoff`` is ENCORE's most-probable early stopping (Gupta et al., 2025,
    arXiv 2502.01636; scalable-model-editing/encore ``encore/compute_z.py``): when
    negative, the loop stops at the ``|prob_cutoff|``-th step (counted over the whole
    run, not necessarily consecutive) on which the target is the argmax at every
    target position of every prompt; when positive, once the mean over prompts of
    ``exp(-NLL)`` exceeds it; 0 turns it off. The reference skips the bare prompt in
    that check (it reads rows ``1:``); here the bare prompt counts too.
    """
    tokenizer = lm.tokenizer
    continuation = target_text(request.target_new)
    sequences, lookups, targets = [], [], []
    for prefix in prefixes:
        context, position = subject_last_token(tokenizer, prefix, request.prompt, request.subject)
        context_ids, target_ids = encode_pair(tokenizer, context, continuation)
        sequences.append(context_ids + target_ids[:-1])
        lookups.append(position)
        # logits at position len(context)-1+j predict target token j
        targets.append([(len(context_ids) - 1 + j, t) for j, t in enumerate(target_ids)])
    n_rewrite = len(sequences)
    for template in kl_prompts:
        text, position = subject_last_token(tokenizer, "", template.format(request.subject), request.subject)
        sequences.append(encode(lm.tokenizer, text))
        lookups.append(position)
    forward, offsets = _batch_runner(lm, sequences, lookups, hook_paths, split_prefix)
    device = lm.device
    rows = torch.arange(len(sequences), device=device)
    lookup = torch.tensor([p - o for p, o in zip(lookups, offsets)], device=device)
    target_rows = torch.tensor([r for r, ts in enumerate(targets) for _ in ts], device=device)
    target_pos = torch.tensor([p - offsets[r] for r, ts in enumerate(targets) for p, _ in ts], device=device)
    target_tok = torch.tensor([t for ts in targets for _, t in ts], device=device)
    # Unembed only the positions the loss reads (the LM head dominates a small model's cost).
    kl_pos = lookup[n_rewrite:]
    needed = torch.unique(torch.cat([target_pos, kl_pos]))
    target_pos, kl_pos = torch.searchsorted(needed, target_pos), torch.searchsorted(needed, kl_pos)

    initial: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}

    def add_delta(path: str) -> Any:
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output
            shaped = by_position(hidden, len(rows))
            if path not in deltas:  # the first step runs unedited: read v0 there (row 0 is the bare prompt)
                # v0 and delta in float32 whatever the model's dtype: Adam's state and eps
                # (1e-8) underflow in float16, and the reference optimises in float32.
                initial[path] = shaped[0, lookup[0]].detach().float()
                deltas[path] = torch.zeros_like(initial[path], requires_grad=True)
            # index_put (not in-place +=) keeps the graph valid for backward.
            delta = deltas[path].to(shaped.dtype).expand(len(rows), -1)
            update = torch.zeros_like(shaped).index_put((rows, lookup), delta)
            hidden = hidden + update.view(hidden.shape)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    optimizer = None
    nll_weight = nll_loss_factor
    kl_init = None
    losses = []
    steps_on_top = 0
    with forward_hooks(lm.model, [(path, add_delta(path)) for path in hook_paths]):
        for step in range(v_num_grad_steps):
            if optimizer is not None:
                optimizer.zero_grad()
            logits = forward(needed).float()
            if optimizer is None:
                not_run = [path for path in hook_paths if path not in deltas]
                if not_run:
                    raise RuntimeError(f"hooked modules {not_run} did not run in the forward pass")
                optimizer = torch.optim.Adam([deltas[p] for p in hook_paths], lr=v_lr)
                max_norms = {path: clamp_norm_factor * initial[path].norm() for path in hook_paths}
            target_logits = logits[target_rows, target_pos]
            nll_each = target_nll(target_logits, target_tok, groups=target_rows, n_groups=n_rewrite)
            nll = nll_each.mean()
            kl_log_probs = torch.log_softmax(logits[rows[n_rewrite:], kl_pos], dim=-1)
            if kl_init is None:
                kl_init = kl_log_probs.detach().clone()
            kl = kl_factor * F.kl_div(kl_init, kl_log_probs, log_target=True, reduction="batchmean")
            decay = v_weight_decay * sum(deltas[p].norm() / initial[p].norm() ** 2 for p in hook_paths)
            loss = nll_weight * nll + kl + decay
            losses.append(loss.item())
            on_top = _target_on_top(target_logits, target_tok) if adaptive_nll or prob_cutoff < 0 else False
            if prob_cutoff < 0 and on_top:
                steps_on_top += 1
                if steps_on_top >= abs(prob_cutoff):
                    break
            if prob_cutoff > 0 and torch.exp(-nll_each.detach()).mean().item() > prob_cutoff:
                break
            if losses[-1] < early_stop_loss or step == v_num_grad_steps - 1:
                break
            if adaptive_nll:
                if on_top:
                    nll_weight = 0.1 * nll_loss_factor
                    if kl.item() <= 0.01:
                        break
                else:
                    nll_weight = nll_loss_factor
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for path, delta in deltas.items():
                    norm = delta.norm()
                    if norm > max_norms[path]:
                        delta.mul_(max_norms[path] / norm)
    return {path: TargetValue(value=(initial[path] + deltas[path]).detach(), initial=initial[path],
                              losses=tuple(losses)) for path in hook_paths}

"""Forward passes over batches of token sequences, with exact padding and shared prefixes.

Two ways to run a batch of contexts, both ending with the logits after each
context's last token, a key/value cache over every context, the 2-D attention
mask of that cache's columns and each context's length (the next position id):

* **left padding**: pads first, real tokens last, explicit ``position_ids``
  (so absolute position embeddings such as GPT-2's see the unpadded positions)
  and logits for the last column only (``logits_to_keep=1``);
* **shared prefix**: few-shot prompts repeat a long prefix (about 85% of an
  MMLU 5-shot prompt, 95% of GSM8K's 8 shots). The longest token prefix common
  to the batch is run once (and reused by the next batch when it shares it),
  its cache is copied to every row, and only the remainders run, right-padded,
  with logits at each row's last real column.

With a shared prefix, padding sits *between* a row's remainder and what is
appended later (continuation tokens, generated tokens). Masked columns are
exact for full attention, but a sliding-window layer counts columns, not
positions, so the prefix path is used only when the model has no sliding
window or every sequence fits inside it; otherwise left padding is used.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..kv_cache import select_rows
from .api import ModelRunner

__all__ = [
    "ContextBatch",
    "PrefixMemo",
    "auto_batch_size",
    "bytes_per_sequence",
    "memory_budget",
    "plan_batches",
    "run_contexts",
    "sliding_window",
]

log = logging.getLogger(__name__)

_PADDING_SLACK = 64  # padding tokens a batch may always carry, see plan_batches
_HEAD = 32  # contexts whose first _HEAD tokens agree are batched together, to share their prefix


@dataclass
class ContextBatch:
    """The state after running a batch of contexts.

    Attributes:
        logits: ``(batch, vocab)`` logits after each context's last token.
        cache: the model's key/value cache over every column of ``mask``.
        mask: ``(batch, columns)`` attention mask (1 = real token).
        lengths: ``(batch,)`` number of real tokens, i.e. the next position id.
    """

    logits: torch.Tensor
    cache: object
    mask: torch.Tensor
    lengths: torch.Tensor


@dataclass
class PrefixMemo:
    """The last shared prefix run within one engine call (never across calls: the model may change)."""

    tokens: tuple[int, ...] = ()
    cache: object = None


def sliding_window(config: object) -> int | None:
    """The model's sliding attention window in tokens, or None if every layer attends to all tokens."""
    window = getattr(config, "sliding_window", None)
    if not window or not getattr(config, "use_sliding_window", True):
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and not any("sliding" in str(kind) for kind in layer_types):
        return None
    return int(window)


def plan_batches(contexts: Sequence[Sequence[int]], batch_size: int, max_padding: float = 0.25
                 ) -> list[tuple[list[int], int]]:
    """Split context indices into batches that run well, each with the prefix length its set shares.

    Contexts that share their first tokens with others (a few-shot prompt) are
    batched only with each other, and every batch of such a set shares the
    set's longest common prefix (so it is run once for the whole set); the
    other contexts are batched together. Within each set, longer contexts come
    first, so the rows of a batch have similar lengths and memory trouble shows
    at once. A batch also ends before a row that would make its padding more
    than ``max_padding`` of its real tokens plus 64 (one-subject-each MMLU
    prompts range from 300 to 2,500 tokens: padded batches ran slower than one
    prompt at a time on CPU; short remainders after a shared prefix stay
    together).
    """
    sets: dict[tuple, list[int]] = {}
    for i, context in enumerate(contexts):
        sets.setdefault(tuple(context[:_HEAD]), []).append(i)
    shared = [members for members in sets.values() if len(members) > 1]
    alone = [members[0] for members in sets.values() if len(members) == 1]
    batches = []
    for members in sorted(shared, key=lambda m: m[0]) + ([alone] if alone else []):
        members = sorted(members, key=lambda i: (-len(contexts[i]), i))
        # Leave every context at least one token after the prefix: its logits score what follows.
        prefix = min(_common_prefix([contexts[i] for i in members]), min(len(contexts[i]) for i in members) - 1)
        batch: list[int] = []
        for i in members:
            if batch:
                longest = len(contexts[batch[0]]) - prefix
                real = sum(len(contexts[j]) - prefix for j in batch) + len(contexts[i]) - prefix
                padded = (len(batch) + 1) * longest
                if len(batch) == batch_size or padded > (1 + max_padding) * real + _PADDING_SLACK:
                    batches.append((batch, prefix))
                    batch = []
            batch.append(i)
        batches.append((batch, prefix))
    return batches


def _common_prefix(sequences: Sequence[Sequence[int]]) -> int:
    first, length = sequences[0], min(len(s) for s in sequences)
    for other in sequences[1:]:
        n = 0
        while n < length and other[n] == first[n]:
            n += 1
        length = n
    return length


def run_contexts(engine: ModelRunner, contexts: Sequence[Sequence[int]], shared: int, extra_columns: int,
                 memo: PrefixMemo, use_cache: bool = True) -> ContextBatch:
    """Run a batch of non-empty contexts.

    Args:
        engine: supplies the model, padding id and sharing settings.
        contexts: token ids per row.
        shared: length of a prefix common to every context, shorter than each
            (from :func:`plan_batches`).
        extra_columns: how many columns will be appended afterwards (longest
            continuation or generation budget), for the sliding-window check.
        memo: the prefix run by an earlier batch of the same call (reused when equal, else replaced).
        use_cache: keep the key/value cache (not needed for one-token continuations).
    """
    window = sliding_window(engine.model.config)
    columns = max(len(c) for c in contexts) + extra_columns
    if engine.share_prefix and shared >= engine.min_shared_prefix and (window is None or columns <= window):
        return _run_with_prefix(engine, contexts, shared, memo)
    return _run_left_padded(engine, contexts, use_cache)


def _run_left_padded(engine: ModelRunner, contexts: Sequence[Sequence[int]], use_cache: bool) -> ContextBatch:
    ids, mask = engine.pad(contexts, side="left")
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    output = engine.forward(ids, mask, positions, keep=1, use_cache=use_cache)
    return ContextBatch(output.logits[:, -1], output.past_key_values, mask, mask.sum(-1))


def _run_with_prefix(engine: ModelRunner, contexts: Sequence[Sequence[int]], shared: int, memo: PrefixMemo
                     ) -> ContextBatch:
    device = engine.device
    prefix = tuple(contexts[0][:shared])
    if memo.tokens != prefix or memo.cache is None:
        ids = torch.tensor([prefix], device=device)
        positions = torch.arange(shared, device=device)[None]
        output = engine.forward(ids, torch.ones_like(ids), positions, keep=1, use_cache=True)
        memo.tokens, memo.cache = prefix, output.past_key_values
    rows = len(contexts)
    cache = select_rows(memo.cache, torch.zeros(rows, dtype=torch.long, device=device))
    remainders = [c[shared:] for c in contexts]
    ids, remainder_mask = engine.pad(remainders, side="right")
    mask = torch.cat([remainder_mask.new_ones((rows, shared)), remainder_mask], dim=1)
    positions = shared + torch.arange(ids.shape[1], device=device).expand(rows, -1)
    last = torch.tensor([len(r) - 1 for r in remainders], device=device)
    keep, where = torch.unique(last, return_inverse=True)  # logits only at the columns some row ends on
    output = engine.forward(ids, mask, positions, keep=keep, past_key_values=cache, use_cache=True)
    logits = output.logits[torch.arange(rows, device=device), where]
    return ContextBatch(logits, output.past_key_values, mask, mask.sum(-1))


# -- automatic batch size -------------------------------------------------------------------------


def _config_int(config: object, *names: str, default: int) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def bytes_per_sequence(config: object, element_size: int, length: int, logit_positions: int) -> int:
    """A generous estimate of the memory one sequence of ``length`` tokens needs during a batch.

    The terms, per sequence:

    * key/value cache, counted three times: the shared prefix's cache is copied
      to every row, the continuation pass copies it again, and appending a
      column to a cache reallocates it;
    * activations of one layer at a time (inference keeps no others): the MLP's
      input, gate and up projections and a few residual-sized buffers;
    * attention scores, ``heads x length x length``, in case the attention
      kernel materialises them (eager attention, or SDPA's math path on CPU);
    * float32 logits at the positions kept, with a log-softmax copy.

    Args:
        config: the model's HF config (names of GPT-2, Llama and most others are read).
        element_size: bytes per element of the model's dtype.
        length: tokens in the longest sequence of the batch, appended tokens included.
        logit_positions: positions per sequence whose logits are computed.
    """
    layers = _config_int(config, "num_hidden_layers", "n_layer", "num_layers", default=32)
    hidden = _config_int(config, "hidden_size", "n_embd", "d_model", default=4096)
    heads = _config_int(config, "num_attention_heads", "n_head", default=32)
    kv_heads = _config_int(config, "num_key_value_heads", default=heads)
    head_dim = _config_int(config, "head_dim", default=hidden // heads)
    intermediate = _config_int(config, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)
    vocab = _config_int(config, "vocab_size", default=50_000)
    cache = 3 * 2 * layers * kv_heads * head_dim * length * element_size
    activations = length * (3 * intermediate + 4 * hidden) * element_size
    scores = heads * length * length * max(element_size, 4)
    logits = 3 * vocab * 4 * max(logit_positions, 1)
    return cache + activations + scores + logits


def memory_budget(device: torch.device, fraction: float | None = None) -> int:
    """Bytes that evaluation may use on ``device``.

    On an accelerator whose torch backend reports free memory (``torch.<type>.mem_get_info``:
    CUDA, XPU): ``fraction`` (default 0.8) of the free device memory, the loaded
    model already excluded. Elsewhere (CPU, MPS's unified memory): ``fraction``
    (default 0.5) of the available system memory.
    """
    free_memory = getattr(getattr(torch, device.type, None), "mem_get_info", None)
    if free_memory is not None:
        free, _ = free_memory(device)
        return int(free * (0.8 if fraction is None else fraction))
    import psutil  # a dependency of accelerate

    return int(psutil.virtual_memory().available * (0.5 if fraction is None else fraction))


def auto_batch_size(config: object, element_size: int, length: int, logit_positions: int, cap_bytes: int,
                    max_batch_size: int) -> int:
    """The largest batch (1 to ``max_batch_size``) whose estimated memory fits in ``cap_bytes``.

    See :func:`bytes_per_sequence` for the estimate; it is deliberately
    pessimistic, so the batch chosen fits without trying and failing.
    """
    per_sequence = bytes_per_sequence(config, element_size, length, logit_positions)
    size = max(1, min(max_batch_size, cap_bytes // per_sequence))
    log.info("auto batch size %d: ~%.1f MB per sequence of %d tokens, cap %.0f MB", size, per_sequence / 2**20,
             length, cap_bytes / 2**20)
    return int(size)

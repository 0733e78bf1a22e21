"""Run the same batch many times when only the tail of each row changes.

Target optimisation (ROME's v*, MEMIT's z, PMET's joint targets) adds a trained
vector to one module's output at the subject's last token and runs the batch
20-odd times. Under causal attention every position before that token is the same
at every step, in every layer, and every position of the layers below the edited
block is the same too. :class:`PrefixCachedBatch` computes those once:

* the *prefix* of row ``r`` (its first ``split[r]`` tokens) runs once, without
  gradients, into a key/value cache;
* each call then runs only the *suffix* (the tokens from ``split[r]`` on) against
  a shallow copy of that cache;
* from the second call on, the blocks below ``first_block`` return their
  recorded output instead of running (their input, the suffix tokens and the
  cached prefix, never changes).

Layout. Prefixes are left-padded to the longest (``P`` slots) and suffixes
right-padded to the longest (``W`` slots), so row ``r``'s token ``i`` sits at slot
``P - split[r] + i``. The distance between two slots is then the distance
between the tokens, which keeps sliding-window masks exact, and explicit position
ids give every token its position in the unpadded row (rotary and learned
absolute positions alike). Padded prefix slots are masked and their cached keys
and values zeroed.

Whatever cannot be split exactly is refused at construction with
:class:`SplitUnsupported` (the caller runs the full batch instead and logs why):
a model whose forward takes no cache or ``position_ids``, a cache
other than the dynamic full and sliding-window layers, a non-finite prefix. The
block skip is dropped (with a debug log) when the input of ``first_block`` is not
the output of the block before it.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .hooks import forward_hooks, forward_pre_hooks, get_module, replaced_forward
from .kv_cache import fresh_copy

__all__ = ["PrefixCachedBatch", "SplitUnsupported", "logits_at"]

log = logging.getLogger(__name__)


class SplitUnsupported(RuntimeError):
    """This model's forward pass cannot be split into a cached prefix and a suffix exactly."""


def _tensor(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


class PrefixCachedBatch:
    """A right-padded batch whose first ``splits[r]`` tokens of row ``r`` never change.

    Args:
        model: a Hugging Face causal LM (eval mode).
        sequences: token ids per row.
        splits: per row, the index of the first token whose computation may change
            between calls (``0 <= splits[r] < len(sequences[r])``).
        pad_id: the padding token id.
        blocks: module path of the model's list of transformer blocks (for the block skip).
        first_block: the lowest block whose computation may change; blocks below it
            are skipped after the first call. ``0`` skips nothing.

    Raises:
        SplitUnsupported: the split would not reproduce the full forward pass.
    """

    def __init__(self, model: nn.Module, sequences: Sequence[Sequence[int]], splits: Sequence[int], pad_id: int,
                 blocks: str | None = None, first_block: int = 0) -> None:
        parameters = inspect.signature(model.forward).parameters
        # transformers 5 renamed ``past_key_values`` to ``cache`` (the old name is deprecated).
        self.cache_argument = next((name for name in ("cache", "past_key_values") if name in parameters), None)
        if self.cache_argument is None or "position_ids" not in parameters:
            raise SplitUnsupported(f"{type(model).__name__}.forward takes no cache or no position_ids")
        if any(not 0 <= s < len(seq) for seq, s in zip(sequences, splits)):
            raise ValueError("every split must leave at least one token in the suffix")
        self.model = model
        self.splits = list(splits)
        self.keeps_logits = "logits_to_keep" in parameters
        device = next(model.parameters()).device
        width_prefix = max(self.splits)
        width_suffix = max(len(seq) - s for seq, s in zip(sequences, self.splits))
        prefix_ids, prefix_mask, prefix_pos, suffix_ids, suffix_mask, suffix_pos = ([] for _ in range(6))
        for seq, s in zip(sequences, self.splits):
            pad, tail = width_prefix - s, width_suffix - (len(seq) - s)
            prefix_ids.append([pad_id] * pad + list(seq[:s]))
            prefix_mask.append([0] * pad + [1] * s)
            prefix_pos.append([0] * pad + list(range(s)))
            suffix_ids.append(list(seq[s:]) + [pad_id] * tail)
            suffix_mask.append([1] * (len(seq) - s) + [0] * tail)
            suffix_pos.append(list(range(s, s + width_suffix)))
        self.suffix_ids = _tensor(suffix_ids, device)
        self.position_ids = _tensor(suffix_pos, device)
        self.attention_mask = _tensor([p + q for p, q in zip(prefix_mask, suffix_mask)], device)
        self.cache = None
        if width_prefix:
            self.cache = self._prefix_cache(_tensor(prefix_ids, device), _tensor(prefix_mask, device),
                                            _tensor(prefix_pos, device))
        self.blocks = blocks
        n_blocks = len(get_module(model, blocks)) if blocks else 0
        self.first_block = first_block if 0 < first_block < n_blocks else 0
        self._below: Any = None  # the output of block first_block - 1, recorded on the first call

    def _prefix_cache(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> Any:
        from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

        kwargs: dict[str, Any] = {"logits_to_keep": 1} if self.keeps_logits else {}
        with torch.no_grad():
            cache = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                               **kwargs).past_key_values
        if not isinstance(cache, DynamicCache) or any(type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer)
                                                      for layer in cache.layers):
            raise SplitUnsupported(f"cache {type(cache).__name__} is not made of dynamic full or sliding layers")
        width = ids.shape[1]
        padded = (mask == 0)[:, None, :, None]
        for layer in cache.layers:
            if not layer.is_initialized:
                continue
            if layer.keys.shape[-2] != width:  # a sliding layer dropped slots: the cache is not the whole prefix
                raise SplitUnsupported(f"cache layer keeps {layer.keys.shape[-2]} of {width} prefix slots")
            layer.keys = layer.keys.masked_fill(padded, 0.0)
            layer.values = layer.values.masked_fill(padded, 0.0)
            if not (torch.isfinite(layer.keys).all() and torch.isfinite(layer.values).all()):
                raise SplitUnsupported("the cached prefix is not finite")
        return cache

    def suffix_index(self, row: int, position: int) -> int:
        """Where token ``position`` of row ``row`` sits in the suffix passes."""
        index = position - self.splits[row]
        if index < 0:
            raise ValueError(f"position {position} of row {row} is in the cached prefix")
        return index

    @contextlib.contextmanager
    def _record_below(self) -> Iterator[None]:
        """Record block ``first_block - 1``'s output, if it is exactly block ``first_block``'s input."""
        seen: dict[str, Any] = {}

        def output_hook(module: nn.Module, args: tuple, output: Any) -> None:
            seen["output"] = output

        def input_hook(module: nn.Module, args: tuple) -> None:
            seen["input"] = args[0] if args else None  # passed by keyword: no skip

        with forward_hooks(self.model, [(f"{self.blocks}.{self.first_block - 1}", output_hook)]), \
                forward_pre_hooks(self.model, [(f"{self.blocks}.{self.first_block}", input_hook)]):
            yield
        output = seen.get("output")
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden is None or seen.get("input") is not hidden:
            log.debug("block %d's input is not block %d's output; running every block at every step",
                      self.first_block, self.first_block - 1)
            self.first_block = 0
            return
        self._below = tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in output) \
            if isinstance(output, tuple) else output.detach()

    def _skip_below(self) -> contextlib.AbstractContextManager[None]:
        below = self._below

        def recorded(*args: Any, **kwargs: Any) -> Any:
            return below

        return replaced_forward(self.model, [f"{self.blocks}.{i}" for i in range(self.first_block)], recorded)

    def __call__(self, logits_to_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the suffix passes (at ``logits_to_keep`` suffix indices, when given)."""
        inputs: dict[str, Any] = {"input_ids": self.suffix_ids, "attention_mask": self.attention_mask,
                                  "position_ids": self.position_ids, "use_cache": self.cache is not None}
        if self.cache is not None:
            inputs[self.cache_argument] = fresh_copy(self.cache)
        if not self.first_block:
            context: contextlib.AbstractContextManager = contextlib.nullcontext()
        elif self._below is None:
            context = self._record_below()
        else:
            context = self._skip_below()
        with context:
            return logits_at(self.model, logits_to_keep, self.keeps_logits, **inputs)


def logits_at(model: nn.Module, positions: torch.Tensor | None, keeps_logits: bool, **inputs: Any) -> torch.Tensor:
    """``model(**inputs)``'s logits at ``positions`` of the sequence axis (all when None).

    With ``keeps_logits`` (the forward takes ``logits_to_keep``) only those positions are
    unembedded: the LM head dominates a small model's cost.
    """
    if positions is None:
        return model(**inputs).logits
    if keeps_logits:
        return model(**inputs, logits_to_keep=positions).logits
    return model(**inputs).logits[:, positions]

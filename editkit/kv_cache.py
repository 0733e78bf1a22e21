"""Helpers on Hugging Face key/value caches, shared by the benchmark engine and editors.

A cache computed once over a shared prefix is reused by many later passes (the
engine's few-shot prefixes, GRACE's optimisation steps over one prompt). Each
reuse needs its own copy with the batch rows it runs, because a forward pass
appends to the cache it is given.
"""

from __future__ import annotations

import copy

import torch

__all__ = ["fresh_copy", "select_rows"]


def select_rows(cache: object, rows: torch.Tensor) -> object:
    """A copy of a key/value cache holding only batch ``rows`` (which may repeat).

    The layers are copied shallowly and then re-indexed, which allocates new
    tensors on the copy, so the original cache stays usable.

    Args:
        cache: a ``transformers`` cache with ``layers`` and ``batch_select_indices``.
        rows: ``(n,)`` long tensor of batch indices, on the cache's device.

    Returns:
        A cache of batch size ``n``; ``cache`` itself is unchanged.
    """
    picked = fresh_copy(cache)
    picked.batch_select_indices(rows)
    return picked


def fresh_copy(cache: object) -> object:
    """A copy of a key/value cache that a forward pass can extend without touching ``cache``.

    Cache layers extend by concatenation (``keys = cat([keys, new])``), never in
    place, so copying the cache and its layer objects shallowly is enough: the
    copy shares the stored tensors until its first update replaces them.
    """
    copied = copy.copy(cache)
    copied.layers = [copy.copy(layer) for layer in cache.layers]
    return copied

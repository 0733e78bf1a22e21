"""Second-moment statistics ``C = E[k kᵀ]`` of a module's input keys, cached on disk.

ROME and MEMIT whiten their updates with the uncentred covariance of the keys
entering the MLP output projection. The estimate is accumulated in float64 over
every non-padding token of the corpus and cached under
``<cache>/stats/<model>/<module>/<corpus>-<n>-<dtype>.pt`` so each (model, layer,
corpus, sample count, dtype) is computed once.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .corpus import corpus_key, iter_corpus
from .hooks import forward_hooks
from .paths import cache_root

__all__ = ["second_moment", "stats_path"]

log = logging.getLogger(__name__)


def stats_path(lm: Any, module_path: str, corpus: str, n_samples: int, dtype: str,
               cache_dir: str | os.PathLike[str] | None = None) -> Path:
    model_key = lm.name.replace("/", "_") + "-" + hashlib.sha256(lm.source.encode()).hexdigest()[:8]
    return cache_root(cache_dir) / "stats" / model_key / module_path / f"{corpus_key(corpus)}-{n_samples}-{dtype}.pt"


@torch.no_grad()
def second_moment(lm: Any, module_path: str, corpus: str = "model_samples", n_samples: int = 1000,
                  dtype: str = "float64", *, max_length: int = 128, batch_size: int = 16, seed: int = 0,
                  cache_dir: str | os.PathLike[str] | None = None, progress: bool = True) -> torch.Tensor:
    """Uncentred second moment of the inputs to ``module_path`` (``d_in x d_in``).

    Args:
        lm: a :class:`editkit.models.LoadedModel`.
        module_path: the module whose *input* is the key (the MLP output projection).
        corpus: see :mod:`editkit.corpus`.
        n_samples: number of texts (ROME's ``mom2_n_samples``).
        dtype: accumulation dtype (float64 recommended; the sum over 10^7 tokens
            loses precision in float32).
        max_length: texts are truncated to this many tokens.

    Returns:
        The mean of ``k kᵀ`` over all tokens, in ``dtype`` on the CPU.
    """
    path = stats_path(lm, module_path, corpus, n_samples, dtype, cache_dir)
    if path.exists():
        return torch.load(path, map_location="cpu")["mom2"]
    accumulator: dict[str, Any] = {"sum": None, "count": 0}
    acc_dtype = getattr(torch, dtype)
    mask_holder: dict[str, torch.Tensor] = {}

    def hook(module: torch.nn.Module, args: tuple, output: object) -> None:
        keys = args[0].detach()
        keys = keys[mask_holder["mask"]].to(acc_dtype)  # drop padding positions
        outer = keys.T @ keys
        accumulator["sum"] = outer if accumulator["sum"] is None else accumulator["sum"] + outer
        accumulator["count"] += keys.shape[0]

    tokenizer = lm.tokenizer
    texts = iter_corpus(corpus, lm, n_samples, seed=seed, sample_length=max_length)
    bar = tqdm(total=n_samples, desc=f"second moment {module_path}", disable=not progress, unit="text")
    batch: list[str] = []
    for text in texts:  # lazy: with "model_samples" the model generates between batches
        batch.append(text)
        if len(batch) == batch_size:
            _run(lm, tokenizer, batch, max_length, module_path, hook, mask_holder)
            bar.update(len(batch))
            batch = []
    if batch:
        _run(lm, tokenizer, batch, max_length, module_path, hook, mask_holder)
        bar.update(len(batch))
    bar.close()
    if accumulator["count"] == 0:
        raise ValueError(f"corpus {corpus!r} yielded no tokens")
    mom2 = (accumulator["sum"] / accumulator["count"]).cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"mom2": mom2, "count": accumulator["count"], "corpus": corpus, "n_samples": n_samples}, tmp)
    os.replace(tmp, path)
    log.info("second moment of %s over %d tokens cached at %s", module_path, accumulator["count"], path)
    return mom2


def _run(lm: Any, tokenizer: Any, texts: list[str], max_length: int, module_path: str, hook: Any,
         mask_holder: dict) -> None:
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                    padding_side="right")
    enc = {k: v.to(lm.device) for k, v in enc.items()}
    mask_holder["mask"] = enc["attention_mask"].bool()
    with forward_hooks(lm.model, [(module_path, hook)]):
        lm.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])

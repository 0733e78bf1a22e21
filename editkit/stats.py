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
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from .corpus import corpus_key, iter_corpus
from .hooks import forward_hooks
from .paths import cache_root
from .resources import atomic_torch_save

if TYPE_CHECKING:
    from .models import LoadedModel

__all__ = ["second_moment", "second_moments", "stats_path"]

log = logging.getLogger(__name__)


def stats_path(lm: LoadedModel, module_path: str, corpus: str, n_samples: int, dtype: str,
               cache_dir: str | os.PathLike[str] | None = None) -> Path:
    model_key = lm.name.replace("/", "_") + "-" + hashlib.sha256(lm.source.encode()).hexdigest()[:8]
    return cache_root(cache_dir) / "stats" / model_key / module_path / f"{corpus_key(corpus)}-{n_samples}-{dtype}.pt"


def second_moment(lm: LoadedModel, module_path: str, corpus: str = "model_samples", n_samples: int = 1000,
                  dtype: str = "float64", **options: Any) -> torch.Tensor:
    """Uncentred second moment of the inputs to one module (see :func:`second_moments`)."""
    return second_moments(lm, [module_path], corpus, n_samples, dtype, **options)[module_path]


@torch.no_grad()
def second_moments(lm: LoadedModel, module_paths: Sequence[str], corpus: str = "model_samples", n_samples: int = 1000,
                   dtype: str = "float64", *, max_length: int = 128, batch_size: int = 16, seed: int = 0,
                   cache_dir: str | os.PathLike[str] | None = None, progress: bool = True) -> dict[str, torch.Tensor]:
    """Uncentred second moments of the inputs to each of ``module_paths`` (``d_in x d_in`` each).

    Modules missing from the cache are accumulated together in one pass over the
    corpus (MEMIT needs one matrix per edited layer; sampling the corpus from the
    model is the expensive part).

    Args:
        lm: a :class:`editkit.models.LoadedModel`.
        module_paths: the modules whose *input* is the key (MLP output projections).
        corpus: see :mod:`editkit.corpus`.
        n_samples: number of texts (ROME's ``mom2_n_samples``).
        dtype: accumulation dtype (float64 recommended; the sum over 10^7 tokens
            loses precision in float32).
        max_length: texts are truncated to this many tokens.

    Returns:
        path -> the mean of ``k kᵀ`` over all tokens, in ``dtype`` on the CPU.
    """
    paths = {m: stats_path(lm, m, corpus, n_samples, dtype, cache_dir) for m in module_paths}
    result = {m: torch.load(p, map_location="cpu")["mom2"] for m, p in paths.items() if p.exists()}
    missing = [m for m in module_paths if m not in result]
    if not missing:
        return result
    acc_dtype = getattr(torch, dtype)
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(missing, 0)
    mask_holder: dict[str, torch.Tensor] = {}

    def make_hook(path: str) -> Any:
        def hook(module: torch.nn.Module, args: tuple, output: object) -> None:
            keys = args[0].detach()[mask_holder["mask"]].to(acc_dtype)  # drop padding positions
            outer = keys.T @ keys
            sums[path] = outer if path not in sums else sums[path] + outer
            counts[path] += keys.shape[0]

        return hook

    hooks = [(m, make_hook(m)) for m in missing]
    texts = iter_corpus(corpus, lm, n_samples, seed=seed, sample_length=max_length)
    label = missing[0] if len(missing) == 1 else f"{len(missing)} modules"
    bar = tqdm(total=n_samples, desc=f"second moment {label}", disable=not progress, unit="text")
    batch: list[str] = []
    for text in texts:  # lazy: with "model_samples" the model generates between batches
        batch.append(text)
        if len(batch) == batch_size:
            _run(lm, lm.tokenizer, batch, max_length, hooks, mask_holder)
            bar.update(len(batch))
            batch = []
    if batch:
        _run(lm, lm.tokenizer, batch, max_length, hooks, mask_holder)
        bar.update(len(batch))
    bar.close()
    for module_path in missing:
        if counts[module_path] == 0:
            raise ValueError(f"corpus {corpus!r} yielded no tokens")
        mom2 = (sums[module_path] / counts[module_path]).cpu()
        path = paths[module_path]
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({"mom2": mom2, "count": counts[module_path], "corpus": corpus, "n_samples": n_samples},
                          path)
        log.info("second moment of %s over %d tokens cached at %s", module_path, counts[module_path], path)
        result[module_path] = mom2
    return {m: result[m] for m in module_paths}


def _run(lm: LoadedModel, tokenizer: Any, texts: list[str], max_length: int, hooks: list, mask_holder: dict) -> None:
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                    padding_side="right")
    enc = {k: v.to(lm.device) for k, v in enc.items()}
    mask_holder["mask"] = enc["attention_mask"].bool()
    with forward_hooks(lm.model, hooks):
        lm.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])

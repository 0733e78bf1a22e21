"""Text corpora for second-moment statistics and context templates.

Sources:
    ``"model_samples"``  text sampled from the model itself with a fixed seed
                         (the offline default: no hub, no files needed);
    ``"hf:<id>[:<config>]"``  a HuggingFace dataset's ``text`` column (e.g.
                         ``hf:wikitext:wikitext-103-raw-v1``, ``hf:wikipedia:20220301.en``
                         as ROME used), streamed, where the hub is reachable;
    a folder or ``.txt`` file  local text, one document per file or per blank-line block.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .models import LoadedModel

__all__ = ["sample_texts", "iter_corpus", "corpus_key"]


@torch.no_grad()
def sample_texts(lm: LoadedModel, n: int, max_new_tokens: int, seed: int, top_k: int = 5,
                 batch_size: int = 32) -> list[str]:
    """``n`` texts sampled from the model (top-k sampling) from its start token.

    Deterministic for a seed: a private ``torch.Generator`` on the model's device
    drives the sampling, so the global RNG is neither used nor disturbed.
    """
    tokenizer, model = lm.tokenizer, lm.model
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    device = lm.device
    generator = torch.Generator(device=device).manual_seed(seed)
    texts: list[str] = []
    for offset in range(0, n, batch_size):
        rows = min(batch_size, n - offset)
        ids = torch.full((rows, 1), start, dtype=torch.long, device=device)
        past = None
        new = ids
        generated = []
        for _ in range(max_new_tokens):
            out = model(input_ids=new, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[:, -1, :].float()
            top = torch.topk(logits, top_k, dim=-1)
            probs = torch.softmax(top.values, dim=-1)
            choice = torch.multinomial(probs, 1, generator=generator)
            new = top.indices.gather(1, choice)
            generated.append(new)
        tokens = torch.cat(generated, dim=1)
        texts.extend(tokenizer.batch_decode(tokens, skip_special_tokens=True))
    return texts


def _local_texts(path: Path) -> Iterator[str]:
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    for file in files:
        for block in file.read_text(encoding="utf-8").split("\n\n"):
            if block.strip():
                yield block.strip()


def iter_corpus(source: str, lm: LoadedModel, n_samples: int, seed: int = 0,
                sample_length: int = 128) -> Iterator[str]:
    """Yield up to ``n_samples`` texts from ``source`` (see module docstring)."""
    if source == "model_samples":
        chunk = 64
        for offset in range(0, n_samples, chunk):
            yield from sample_texts(lm, min(chunk, n_samples - offset), sample_length, seed=seed + offset)
        return
    if source.startswith("hf:"):
        import datasets

        name, _, config = source[3:].partition(":")
        stream = datasets.load_dataset(name, config or None, split="train", streaming=True)
        count = 0
        for record in stream:
            text = record.get("text", "")
            if text.strip():
                yield text
                count += 1
                if count >= n_samples:
                    return
        return
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"corpus {source!r} is neither 'model_samples', an 'hf:<dataset>' id, nor an existing path"
        )
    for count, text in enumerate(_local_texts(path)):
        if count >= n_samples:
            return
        yield text


def corpus_key(source: str) -> str:
    """A short, filesystem-safe key identifying a corpus (local files by content)."""
    path = Path(source).expanduser()
    if source not in ("model_samples",) and not source.startswith("hf:") and path.exists():
        digest = hashlib.sha256()
        for file in sorted(path.rglob("*.txt")) if path.is_dir() else [path]:
            digest.update(file.read_bytes())
        return f"local-{digest.hexdigest()[:12]}"
    return source.replace("/", "_").replace(":", "_")

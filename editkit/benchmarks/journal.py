"""An append-only record of finished item rows, so an interrupted evaluation resumes per item.

Generation tasks are slow on a CPU (chain-of-thought BBH takes about 20 s an item
for SmolLM2-135M on one thread), so a long evaluation should not lose its
finished items when it is stopped. :func:`~editkit.benchmarks.evaluate` with
``journal=<folder>`` evaluates each task in slices of items and appends each
slice's rows to ``<folder>/<task>.jsonl`` as soon as it is scored. A rerun with
the same folder reads the rows back and evaluates only the items after them.

The file's first line is a header naming what the rows belong to: the task and
its version, the number of shots, a digest of the exact prompts (which fixes
the item subset and the data) and a caller-supplied ``key`` (the model, and
for edited models a digest of their weights). A journal whose header does not
match is set aside (renamed ``*.stale``) and the task starts over, with a
warning. A cut-off last line, left by a process killed mid-write, is dropped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..resources import atomic_write_text

__all__ = ["ItemJournal", "journal_header", "journal_path"]

log = logging.getLogger(__name__)

FORMAT = 1


def journal_path(folder: str | os.PathLike[str], task: str) -> Path:
    """The journal file of ``task`` in ``folder``."""
    return Path(folder) / f"{task.replace('/', '--')}.jsonl"


def journal_header(task: str, version: Any, num_fewshot: int, prompts: Sequence[str], key: str) -> dict[str, Any]:
    """What a journal's rows belong to (its first line)."""
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(hashlib.sha256(prompt.encode()).digest())
    return {"format": FORMAT, "task": task, "task_version": version, "num_fewshot": num_fewshot,
            "n_items": len(prompts), "prompts_sha256": digest.hexdigest(), "key": key}


def _plain(value: Any) -> Any:
    """JSON fallback for the numpy scalars and arrays result rows may hold."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"a result row holds a {type(value).__name__}, which the item journal cannot store")


def _same(a: Any, b: Any) -> bool:
    """Header equality after a JSON round trip (tuples become lists, NaN stays NaN)."""
    return json.loads(json.dumps(a, default=_plain)) == json.loads(json.dumps(b, default=_plain))


class ItemJournal:
    """The journal of one task's evaluation (module docstring).

    Args:
        path: the ``.jsonl`` file.
        header: :func:`journal_header` of the evaluation about to run.
    """

    def __init__(self, path: str | os.PathLike[str], header: dict[str, Any]) -> None:
        self.path = Path(path)
        self.header = header

    def load(self, item_ids: Sequence[str]) -> list[dict[str, Any]]:
        """The rows already recorded, in order; the file is rewritten to exactly those rows.

        Args:
            item_ids: the ids of the items about to be evaluated, in order. Recorded
                rows must be the first of them; anything else voids the journal.
        """
        rows = self._read(item_ids)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps(record, default=_plain) + "\n" for record in [self.header, *rows]]
        atomic_write_text(self.path, "".join(lines))
        return rows

    def _read(self, item_ids: Sequence[str]) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        lines = self.path.read_text().split("\n")
        try:
            header = json.loads(lines[0])
        except json.JSONDecodeError:
            header = None
        if not _same(header, self.header):
            stale = self.path.with_name(self.path.name + ".stale")
            log.warning("%s records a different evaluation (task, prompts, shots or model changed); "
                        "set aside as %s and starting the task over", self.path, stale.name)
            os.replace(self.path, stale)
            return []
        rows = []
        for number, line in enumerate(lines[1:], start=2):
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s: line %d is cut off (an interrupted write); dropped", self.path, number)
                break
            if len(rows) >= len(item_ids) or row.get("item_id") != item_ids[len(rows)]:
                log.warning("%s: line %d is item %r, expected %r; later lines dropped", self.path, number,
                            row.get("item_id"), item_ids[len(rows)] if len(rows) < len(item_ids) else None)
                break
            rows.append(row)
        if rows:
            log.info("%s: %d of %d items already evaluated, resuming", self.path, len(rows), len(item_ids))
        return rows

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        """Record finished rows (flushed to disk before returning)."""
        with self.path.open("a") as handle:
            for row in rows:
                handle.write(json.dumps(row, default=_plain, allow_nan=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

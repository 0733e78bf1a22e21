"""Cache and results roots: an explicit argument wins, then ``EDITKIT_*`` variables."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root", "results_root"]


def cache_root(path: str | os.PathLike[str] | None = None) -> Path:
    """Where converted models, statistics and trained artifacts live.

    Order: ``path``, then ``$EDITKIT_CACHE``, then ``~/.cache/editkit``.
    """
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get("EDITKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "editkit"


def results_root(path: str | os.PathLike[str] | None = None) -> Path:
    """Where run results go: ``path``, then ``$EDITKIT_RESULTS``, then ``./results``."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get("EDITKIT_RESULTS")
    return Path(env).expanduser() if env else Path.cwd() / "results"

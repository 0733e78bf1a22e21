"""Read the datasets packaged inside editkit, verifying their checksums.

The files under ``editkit/data`` are xz-compressed copies of ``../shared/data``
(see ``scripts/package_data.py``). ``MANIFEST.sha256`` holds the SHA-256 of each
file's *uncompressed* bytes, so a digest can be compared with the upstream copy.
Nothing is read at import time.
"""

from __future__ import annotations

import functools
import hashlib
import lzma
import os
import secrets
from importlib import resources as importlib_resources
from pathlib import Path
from typing import Any

import torch

__all__ = ["data_root", "list_files", "read_bytes", "read_text", "checksum", "sha256_file", "atomic_torch_save",
           "atomic_write_text", "ChecksumError"]


class ChecksumError(RuntimeError):
    """A packaged file does not match its recorded SHA-256."""


def _atomic(path: str | Path, write: Any) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``.

    The temporary name is unique per process and call, so concurrent writers of one path
    never share (and never rename away) each other's temporary file; the last rename wins.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` through a temporary file, so the file is complete or absent."""
    _atomic(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so the file is complete or absent."""
    _atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_root() -> Path:
    """Folder holding the packaged data."""
    return Path(str(importlib_resources.files("editkit") / "data"))


@functools.lru_cache(maxsize=1)
def _manifest() -> dict[str, str]:
    lines = (data_root() / "MANIFEST.sha256").read_text().splitlines()
    return {rel: digest for digest, rel in (line.split(maxsplit=1) for line in lines if line.strip())}


def checksum(relpath: str) -> str:
    """Recorded SHA-256 of a packaged file's uncompressed bytes."""
    try:
        return _manifest()[relpath]
    except KeyError:
        raise FileNotFoundError(
            f"{relpath!r} is not packaged in editkit; see list_files() for what is"
        ) from None


def list_files(prefix: str = "") -> list[str]:
    """Relative paths of packaged files starting with ``prefix``, sorted."""
    return sorted(rel for rel in _manifest() if rel.startswith(prefix))


def read_bytes(relpath: str) -> bytes:
    """Uncompressed bytes of a packaged file, checked against the manifest.

    Raises:
        FileNotFoundError: the file is not packaged.
        ChecksumError: the stored copy is corrupted.
    """
    digest = checksum(relpath)
    plain = data_root() / relpath
    data = plain.read_bytes() if plain.exists() else lzma.decompress((data_root() / f"{relpath}.xz").read_bytes())
    if hashlib.sha256(data).hexdigest() != digest:
        raise ChecksumError(f"packaged file {relpath!r} does not match its SHA-256 in MANIFEST.sha256")
    return data


def read_text(relpath: str, encoding: str = "utf-8") -> str:
    """Decoded text of a packaged file (see :func:`read_bytes`)."""
    return read_bytes(relpath).decode(encoding)

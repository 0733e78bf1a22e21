"""Package the offline data copies from ``../shared/data`` into ``editkit/data``.

Every data file is stored xz-compressed as ``<relpath>.xz``; license files are kept
as plain text so they are readable in the repository. ``editkit/data/MANIFEST.sha256``
lists the SHA-256 of the *uncompressed* bytes (the same digests as the source
manifest), and :mod:`editkit.resources` checks them on every read.

Usage::

    python scripts/package_data.py [--source ../shared/data] [--datasets mmlu gsm8k ...]
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import lzma
import shutil
from pathlib import Path

log = logging.getLogger("package_data")

DEFAULT_DATASETS = ("counterfact", "zsre", "mmlu", "gsm8k", "bbh", "commonsenseqa", "triviaqa", "truthfulqa")
LICENSE_PREFIXES = ("LICENSE", "README", "UPSTREAM_README")


def _is_license(path: str) -> bool:
    return Path(path).name.startswith(LICENSE_PREFIXES)


def package(source: Path, dest: Path, datasets: tuple[str, ...]) -> None:
    manifest = {}
    for line in (source / "MANIFEST.sha256").read_text().splitlines():
        digest, rel = line.split(maxsplit=1)
        manifest[rel] = digest
    out_lines = []
    for rel, digest in sorted(manifest.items()):
        if rel.split("/", 1)[0] not in datasets:
            continue
        data = (source / rel).read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise ValueError(f"{rel}: checksum differs from {source / 'MANIFEST.sha256'}")
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if _is_license(rel):
            shutil.copyfile(source / rel, target)
        else:
            target = target.with_name(target.name + ".xz")
            target.write_bytes(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
        out_lines.append(f"{digest}  {rel}")
        log.info("%s -> %s (%d -> %d bytes)", rel, target.relative_to(dest), len(data), target.stat().st_size)
    (dest / "MANIFEST.sha256").write_text("\n".join(out_lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--dest", type=Path, default=Path(__file__).resolve().parents[1] / "editkit" / "data")
    parser.add_argument("--datasets", nargs="+", default=list(DEFAULT_DATASETS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    package(args.source, args.dest, tuple(args.datasets))


if __name__ == "__main__":
    main()

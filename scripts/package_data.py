"""Package the offline data copies from ``../shared/data`` into ``editkit/data``.

Every data file is stored xz-compressed as ``<relpath>.xz``; license files are kept
as plain text so they are readable in the repository. ``editkit/data/MANIFEST.sha256``
lists the SHA-256 of the *uncompressed* bytes (the same digests as the source
manifest for copied files), and :mod:`editkit.resources` checks them on every read.

Files are copied unmodified, with one exception: ToxiGen (16.6 MB of prompt
files, each line a list of a few statements repeated over 1,000 lines) is
packaged as its license plus one derived file, ``toxigen/statements.jsonl``:
every distinct statement of the prompt and demonstration files with the
label their file name carries (``hate_*`` -> 1, ``neutral_*`` -> 0). Its
digest is of the derived bytes; the source files it is built from are checked
against the source manifest first.

Usage::

    python scripts/package_data.py [--source ../shared/data] [--datasets mmlu gsm8k ...]

Only the named datasets are (re)written; the manifest keeps the lines of the others.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import lzma
import re
from pathlib import Path, PurePosixPath

log = logging.getLogger("package_data")

DEFAULT_DATASETS = (
    "counterfact", "zsre", "mmlu", "gsm8k", "bbh", "commonsenseqa", "triviaqa", "truthfulqa", "toxigen",
)
LICENSE_PREFIXES = ("LICENSE", "README", "UPSTREAM_README")
# Datasets packaged as a derived file: the source files copied as they are (the rest is only read).
DERIVED_KEEP = {"toxigen": ("toxigen/LICENSE.txt",)}
TOXIGEN_STATEMENTS = "toxigen/statements.jsonl"
_TOXIGEN_SOURCES = re.compile(
    r"toxigen/(prompts|demonstrations/[a-z_]+)/(hate|neutral)_([a-z_]+?)(_1k|_sentences)?\.txt")


def _is_license(path: str) -> bool:
    return Path(path).name.startswith(LICENSE_PREFIXES)


def _read_manifest(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    return {rel: digest for digest, rel in (line.split(maxsplit=1) for line in path.read_text().splitlines() if line)}


def _checked(source: Path, rel: str, digest: str) -> bytes:
    data = (source / rel).read_bytes()
    if hashlib.sha256(data).hexdigest() != digest:
        raise ValueError(f"{rel}: checksum differs from {source / 'MANIFEST.sha256'}")
    return data


def _store(dest: Path, rel: str, data: bytes) -> None:
    target = dest / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    if not _is_license(rel):
        target = target.with_name(target.name + ".xz")
        data = lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)
    target.write_bytes(data)
    log.info("%s -> %s (%d bytes stored)", rel, target.relative_to(dest), len(data))


def prompt_statements(line: str) -> list[str]:
    """The statements of one ToxiGen prompt line.

    A line lists statements as ``"- s1\\n- s2\\n...\\n-"`` where ``\\n`` is the
    literal two-character sequence; a few lines end ``"...s6-"`` without it.
    """
    line = line.rstrip()
    line = line.removesuffix("-")
    statements = []
    for part in line.split("\\n"):
        part = part.strip()
        part = part.removeprefix("-").strip()
        if part:
            statements.append(part)
    return statements


def toxigen_statements(source: Path, manifest: dict[str, str]) -> bytes:
    """The derived labelled ToxiGen statements as JSON lines, in SHA-256 order of their text.

    Each line: ``{"text", "label" (1 hateful, 0 benign), "target_group", "sources"}``;
    ``target_group`` is the group named by the first source file, ``sources``
    every file the statement occurs in.
    """
    found: dict[str, dict] = {}
    for rel, digest in sorted(manifest.items()):
        match = _TOXIGEN_SOURCES.fullmatch(rel)
        if not match:
            continue
        folder, kind, group = match.group(1), match.group(2), match.group(3)
        text = _checked(source, rel, digest).decode("utf-8")
        lines = text.splitlines()
        statements = ([s for line in lines for s in prompt_statements(line)] if folder == "prompts"
                      else [line.strip() for line in lines if line.strip()])
        label = 1 if kind == "hate" else 0
        for statement in statements:
            entry = found.setdefault(statement, {"label": label, "target_group": group, "sources": []})
            if entry["label"] != label:
                raise ValueError(f"ToxiGen statement labelled both ways ({entry['sources'][0]}, {rel}): {statement!r}")
            if rel not in entry["sources"]:
                entry["sources"].append(rel)
    order = sorted(found, key=lambda s: hashlib.sha256(s.encode("utf-8")).hexdigest())
    lines = [json.dumps({"text": s, **found[s]}, ensure_ascii=False) for s in order]
    log.info("toxigen: %d statements (%d hateful)", len(order), sum(found[s]["label"] for s in order))
    return ("\n".join(lines) + "\n").encode("utf-8")


def package(source: Path, dest: Path, datasets: tuple[str, ...]) -> None:
    manifest = _read_manifest(source / "MANIFEST.sha256")
    kept = {rel: digest for rel, digest in _read_manifest(dest / "MANIFEST.sha256").items()
            if PurePosixPath(rel).parts[0] not in datasets}
    for rel, digest in sorted(manifest.items()):
        dataset = PurePosixPath(rel).parts[0]
        if dataset not in datasets or (dataset in DERIVED_KEEP and rel not in DERIVED_KEEP[dataset]):
            continue
        _store(dest, rel, _checked(source, rel, digest))
        kept[rel] = digest
    if "toxigen" in datasets:
        data = toxigen_statements(source, manifest)
        _store(dest, TOXIGEN_STATEMENTS, data)
        kept[TOXIGEN_STATEMENTS] = hashlib.sha256(data).hexdigest()
    (dest / "MANIFEST.sha256").write_text("".join(f"{kept[rel]}  {rel}\n" for rel in sorted(kept)))


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

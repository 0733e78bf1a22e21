"""Package the held-out prose of :mod:`editkit.health` into ``editkit/data/heldout``.

The text is *Botchan (Master Darling)* by Natsume Soseki in Yasotaro Morri's English
translation (1918, revised by J. R. Kennedy 1919), Project Gutenberg eBook #8868, a public
domain work in the United States. It is read from the copy that the ``sentencepiece``
sdist ships as a test corpus, so it can be fetched here with pip:

    pip download --no-deps --no-binary :all: sentencepiece==0.2.3 -d /tmp/heldout
    python scripts/package_heldout.py /tmp/heldout/sentencepiece-0.2.3.tar.gz

What the script does to the upstream file (``sentencepiece-0.2.3/test/botchan.txt``,
CRLF line ends, a BOM, hard-wrapped at 72 columns, blank lines already removed):

1. keeps the lines between the Project Gutenberg START marker and ``--(THE END)--``
   and drops the ``Produced by ...`` credit: no reference to Project Gutenberg is left in
   the text, as the license's section 1.C asks of a redistributed public domain work;
2. drops the translator's footnotes (``[Footnote N: ...]`` blocks) and the transcriber's
   markers (``[1]``, ``[A]``, ``([D])``) that point to footnotes and typo notes;
3. rejoins the hard-wrapped lines into paragraphs: a line ends a paragraph when it ends a
   sentence (or a quotation), the next line does not start in lower case, and the next
   line's first word would have fitted on it within :data:`WRAP_WIDTH` columns; when it
   would have fitted within :data:`SHORT_LINE` columns whatever the line ends with (the
   title page); or when either line is a heading (``CHAPTER ...``, an all-capitals title).
   The blank lines were lost upstream, so this is a heuristic: a few paragraphs may be
   split or run together;
4. writes the paragraphs separated by one blank line (UTF-8, LF, final newline) as
   ``botchan.txt.xz`` (xz preset 9 extreme), the Project Gutenberg license (the upstream
   file from its END marker on) as ``LICENSE``, and the sentencepiece package's license as
   ``LICENSE_sentencepiece``.

The script logs the SHA-256 of the archive, of the upstream member and of the stored
(uncompressed) text; ``editkit.health.HELDOUT_SHA256`` and ``heldout/README.md`` record the
last. Re-running it on the same archive reproduces the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import lzma
import re
import tarfile
from pathlib import Path

log = logging.getLogger("package_heldout")

MEMBER = "sentencepiece-0.2.3/test/botchan.txt"
PACKAGE_LICENSE = "sentencepiece-0.2.3/sentencepiece/LICENSE"
OUT = Path(__file__).resolve().parents[1] / "editkit" / "data" / "heldout"
START = "*** START OF THIS PROJECT GUTENBERG EBOOK"
END = "*** END OF THIS PROJECT GUTENBERG EBOOK"
THE_END = "--(THE END)--"
# The file is wrapped at 72 columns or a little less (a few lines reach 74).
WRAP_WIDTH = 72
SENTENCE_ENDS = (".", "?", "!", '"', "'", ")", ":")
# A line with room for 12 more columns is never a wrapped one (the title page's lines).
SHORT_LINE = 60
_MARKER = re.compile(r" ?\(\[[A-Z]\]\)| ?\[(?:\d+|[A-Z])\]")
_HEADING = re.compile(r"^(CHAPTER [IVXL]+\.?|[A-Z0-9 ().,'-]+)$")


def _read_member(archive: Path, member: str) -> bytes:
    with tarfile.open(archive) as tar:
        handle = tar.extractfile(member)
        if handle is None:
            raise FileNotFoundError(f"{member} is not a file in {archive}")
        return handle.read()


def _body_lines(text: str) -> list[str]:
    """Lines of the book itself: between the START marker and THE END, credits, footnotes and markers removed."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(START))
    stop = next(i for i, line in enumerate(lines) if line.strip() == THE_END)
    kept: list[str] = []
    in_footnote = False
    for line in lines[start + 1:stop]:
        if line.startswith("Produced by "):
            continue
        if line.startswith("[Footnote "):
            in_footnote = True
        if in_footnote:
            in_footnote = not line.rstrip().endswith("]")
            continue
        kept.append(_MARKER.sub("", line).rstrip())
    if any("gutenberg" in line.lower() for line in kept):
        raise ValueError("a reference to Project Gutenberg is left in the text")
    return [line for line in kept if line]


def _is_heading(line: str) -> bool:
    return bool(_HEADING.match(line.strip())) and any(c.isalpha() for c in line)


def paragraphs(lines: list[str]) -> list[str]:
    """Rejoin hard-wrapped ``lines`` into paragraphs (see step 3 of the module docstring)."""
    result: list[str] = []
    current: list[str] = []
    for index, line in enumerate(lines):
        current.append(line.strip())
        following = lines[index + 1] if index + 1 < len(lines) else None
        fit = len(line) + 1 + len(following.split()[0]) if following is not None else 0
        ends = (following is None or _is_heading(line) or _is_heading(following) or fit <= SHORT_LINE
                or (fit <= WRAP_WIDTH and line.endswith(SENTENCE_ENDS) and not following.lstrip()[0].islower()))
        if ends:
            result.append(" ".join(current))
            current = []
    return result


def package(archive: Path, out: Path = OUT) -> str:
    """Write the held-out files from the sentencepiece sdist ``archive``; returns the text's SHA-256."""
    log.info("archive %s sha256 %s", archive.name, hashlib.sha256(archive.read_bytes()).hexdigest())
    raw = _read_member(archive, MEMBER)
    log.info("member %s sha256 %s (%d bytes)", MEMBER, hashlib.sha256(raw).hexdigest(), len(raw))
    text = raw.decode("utf-8-sig").replace("\r\n", "\n")
    body = "\n\n".join(paragraphs(_body_lines(text))) + "\n"
    data = body.encode("utf-8")
    digest = hashlib.sha256(data).hexdigest()
    lines = text.splitlines()
    license_start = next(i for i, line in enumerate(lines) if line.startswith(END))
    out.mkdir(parents=True, exist_ok=True)
    (out / "botchan.txt.xz").write_bytes(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
    (out / "LICENSE").write_text("\n".join(lines[license_start:]) + "\n", encoding="utf-8")
    (out / "LICENSE_sentencepiece").write_bytes(_read_member(archive, PACKAGE_LICENSE))
    log.info("wrote %s: %d paragraphs, %d words, %d bytes, sha256 %s", out / "botchan.txt.xz",
             body.count("\n\n") + 1, len(body.split()), len(data), digest)
    return digest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("archive", type=Path, help="sentencepiece-0.2.3.tar.gz from pip download")
    parser.add_argument("--out", type=Path, default=OUT, help="output folder (default: editkit/data/heldout)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    package(args.archive, args.out)


if __name__ == "__main__":
    main()

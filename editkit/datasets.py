"""CounterFact and zsRE loaders that turn dataset records into :class:`EditRequest` objects.

Three kinds of ``source`` are understood by both loaders:

* ``"packaged"`` (default): the verified copies inside ``editkit/data`` (see
  ``editkit/data/README.md`` for provenance and what is missing).
* a path to a local ``.json`` (a list of records) or JSON-lines file.
* ``"hf:<dataset id>"`` or ``"hf:<dataset id>@<revision>"``: a Hugging Face Hub dataset,
  loaded with :func:`datasets.load_dataset`; ``split`` is passed through unchanged.

Record order is the file's order and ``n`` takes a prefix, as in ROME/MEMIT's
evaluations. With ``shuffle_seed`` a seeded permutation of all records is applied first.
Records are converted lazily in that order until ``n`` valid requests are collected, so a
malformed record past the prefix that is used never raises. Targets are stripped of
surrounding whitespace: :class:`EditRequest` stores them without the leading space that
GPT-style tokenisation wants; adding it is left to the code that tokenises targets.

Nothing is read at import time; :mod:`datasets` (Hugging Face) is imported only for
``hf:`` sources.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from editkit import resources
from editkit.types import EditRequest, InvalidRequestError

__all__ = ["load_counterfact", "load_zsre", "data_checksums"]

log = logging.getLogger(__name__)

OnInvalid = Literal["raise", "skip"]

_PACKAGED: dict[str, dict[str, str]] = {
    "counterfact": {
        split: f"counterfact/easyedit_format/counterfact-{split}.json" for split in ("edit", "train", "val")
    },
    "zsre": {"eval": "zsre/zsre_mend_eval.first1000.json", "train": "zsre/zsre_mend_train-1k.json"},
}
_MISSING = object()
_N_SKIPPED_SHOWN = 5


# Sources


@dataclass(frozen=True)
class _Source:
    """Where one load reads from: ``kind`` is "packaged", "file" or "hub"."""

    kind: str
    location: str  # packaged relpath, resolved file path, or hub dataset id
    revision: str | None = None

    @property
    def label(self) -> str:
        if self.kind == "hub":
            return f"hf:{self.location}" + (f"@{self.revision}" if self.revision else "")
        return self.location


def _resolve(dataset: str, split: str, source: str | os.PathLike) -> _Source:
    if dataset not in _PACKAGED:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(sorted(_PACKAGED))}")
    if isinstance(source, str) and source == "packaged":
        splits = _PACKAGED[dataset]
        if split not in splits:
            raise ValueError(f"unknown {dataset} split {split!r}; packaged splits: {', '.join(splits)}")
        return _Source("packaged", splits[split])
    if isinstance(source, str) and source.startswith("hf:"):
        dataset_id, _, revision = source[3:].partition("@")
        if not dataset_id:
            raise ValueError(f"empty dataset id in source {source!r}; expected 'hf:<dataset id>[@<revision>]'")
        return _Source("hub", dataset_id, revision or None)
    path = Path(source).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{dataset} source {str(source)!r} is not 'packaged', 'hf:<id>' or an existing file")
    return _Source("file", str(path))


def _parse_json(text: str) -> list[Any]:
    """Records of a JSON list, or of JSON lines (one object per non-empty line)."""
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        if text.lstrip().startswith("["):
            raise
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return parsed if isinstance(parsed, list) else [parsed]


def _read_records(source: _Source, split: str) -> list[Any]:
    if source.kind == "packaged":
        return _parse_json(resources.read_text(source.location))
    if source.kind == "file":
        return _parse_json(Path(source.location).read_text(encoding="utf-8"))
    import datasets  # Hugging Face; imported here so `import editkit` stays cheap and offline

    rows = datasets.load_dataset(source.location, split=split, revision=source.revision)
    return list(rows)


# Record access shared by the three mappings


class _Fields:
    """Typed access to one raw record; every error names the record and the offending key."""

    def __init__(self, record: Any, index: int, label: str, case_id: Any = _MISSING) -> None:
        if case_id is _MISSING:
            case_id = record.get("case_id", index) if isinstance(record, Mapping) else index
        self.case_id = case_id
        self.record_id = f"record {index} (case_id {case_id!r})"
        self.where = f"{label}: {self.record_id}"
        if not isinstance(record, Mapping):
            raise self.error(f"expected a JSON object, got {type(record).__name__}")
        self.record = record

    def error(self, message: str) -> InvalidRequestError:
        """An error naming the source and record; ``.record_id`` lets a skip report list ids."""
        exc = InvalidRequestError(f"{self.where}: {message}")
        exc.record_id = self.record_id  # type: ignore[attr-defined]
        return exc

    def get(self, path: str, default: Any = _MISSING) -> Any:
        """Value at a dotted ``path``; None counts as missing (Hub rows fill absent fields with None)."""
        value: Any = self.record
        for depth, key in enumerate(path.split(".")):
            if not isinstance(value, Mapping):
                parent = ".".join(path.split(".")[:depth])
                raise self.error(f"field {parent!r} must be an object")
            value = value.get(key)
            if value is None:
                if default is _MISSING:
                    raise self.error(f"missing key {path!r}")
                return default
        return value

    def text(self, path: str, default: Any = _MISSING) -> Any:
        """A string field (or ``default`` when absent)."""
        value = self.get(path, default)
        if value is not default and not isinstance(value, str):
            raise self.error(f"field {path!r} must be a string, got {type(value).__name__}")
        return value

    def target(self, path: str, default: Any = _MISSING) -> Any:
        """A non-empty target string without surrounding whitespace (upstream zsRE has leading spaces)."""
        value = self.text(path, default)
        if value is default:
            return value
        if not value.strip():
            raise self.error(f"field {path!r} is an empty target")
        return value.strip()

    def texts(self, path: str) -> tuple[str, ...]:
        """A string or list of strings as a tuple; absent gives ``()``."""
        value = self.get(path, ())
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise self.error(f"field {path!r} must be a string or a list of strings")
        return tuple(value)

    def request(self, **fields: Any) -> EditRequest:
        """Build the request, prefixing any validation error with the record's location."""
        try:
            return EditRequest(case_id=self.case_id, **fields)
        except InvalidRequestError as exc:
            raise self.error(str(exc)) from None


# Mappings: one raw record -> EditRequest


def _from_easyedit(record: Any, index: int, label: str = "record") -> EditRequest:
    """EasyEdit CounterFact: prompt, subject, target_new, ground_truth, rephrase/locality fields."""
    f = _Fields(record, index, label)
    return f.request(
        prompt=f.text("prompt"),
        subject=f.text("subject"),
        target_new=f.target("target_new"),
        target_true=f.target("ground_truth", None),
        rephrase_prompts=f.texts("rephrase_prompt"),
        locality_prompts=f.texts("locality_prompt"),
        locality_answers=tuple(a.strip() for a in f.texts("locality_ground_truth")),
    )


def _from_rome(record: Any, index: int, label: str = "record") -> EditRequest:
    """ROME ``counterfact.json`` (also the Hub export ``azhx/counterfact``).

    Neighbourhood prompts share the subject's true object, so each gets ``target_true`` as
    its locality answer, as in ROME's neighbourhood score.
    """
    f = _Fields(record, index, label)
    template = f.text("requested_rewrite.prompt")
    subject = f.text("requested_rewrite.subject")
    try:
        prompt = template.format(subject)
    except (IndexError, KeyError, ValueError) as exc:
        raise f.error(f"field 'requested_rewrite.prompt' is not a '{{}}' template ({exc!r}): {template!r}") from None
    target_true = f.target("requested_rewrite.target_true.str", None)
    neighborhood = f.texts("neighborhood_prompts")
    metadata = {
        "relation_id": f.text("requested_rewrite.relation_id", None),
        "target_new_id": f.get("requested_rewrite.target_new.id", None),
        "target_true_id": f.get("requested_rewrite.target_true.id", None),
        "pararel_idx": f.get("pararel_idx", None),
        "attribute_prompts": f.texts("attribute_prompts"),
        "generation_prompts": f.texts("generation_prompts"),
    }
    return f.request(
        prompt=prompt,
        subject=subject,
        target_new=f.target("requested_rewrite.target_new.str"),
        target_true=target_true,
        rephrase_prompts=f.texts("paraphrase_prompts"),
        locality_prompts=neighborhood,
        locality_answers=(target_true,) * len(neighborhood) if target_true else (),
        metadata={k: v for k, v in metadata.items() if v is not None},
    )


def _from_mend(record: Any, index: int, label: str = "record") -> EditRequest:
    """MEND-format zsRE: src, subject, alt, answers, rephrase, loc, loc_ans (pred, cond kept)."""
    f = _Fields(record, index, label, case_id=index)
    answers = f.get("answers")
    if not isinstance(answers, (list, tuple)) or not answers or not all(isinstance(a, str) for a in answers):
        raise f.error("field 'answers' must be a non-empty list of strings")
    return f.request(
        prompt=f.text("src"),
        subject=f.text("subject"),
        target_new=f.target("alt"),
        target_true=answers[0].strip(),
        rephrase_prompts=f.texts("rephrase"),
        locality_prompts=f.texts("loc"),
        locality_answers=tuple(a.strip() for a in f.texts("loc_ans")),
        metadata={"pred": f.text("pred", None), "cond": f.text("cond", None), "answers": tuple(answers)},
    )


def _detect_counterfact(records: Sequence[Any]) -> Callable[[Any, int, str], EditRequest]:
    """ROME records carry ``requested_rewrite``; anything else is read as EasyEdit format."""
    first = records[0] if records else {}
    return _from_rome if isinstance(first, Mapping) and "requested_rewrite" in first else _from_easyedit


# The shared driver


def _convert(
    records: Sequence[Any],
    mapping: Callable[[Any, int, str], EditRequest],
    label: str,
    n: int | None,
    shuffle_seed: int | None,
    on_invalid: OnInvalid,
) -> list[EditRequest]:
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise ValueError(f"n must be a non-negative int or None, got {n!r}")
    if on_invalid not in ("raise", "skip"):
        raise ValueError(f"on_invalid must be 'raise' or 'skip', got {on_invalid!r}")
    order: Sequence[int] = range(len(records))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(records)).tolist()
    requests: list[EditRequest] = []
    skipped: list[InvalidRequestError] = []
    for index in order:
        if n is not None and len(requests) >= n:
            break
        try:
            requests.append(mapping(records[index], index, label))
        except InvalidRequestError as exc:
            if on_invalid == "raise":
                raise
            skipped.append(exc)
    if skipped:
        ids = ", ".join(getattr(exc, "record_id", "?") for exc in skipped[:_N_SKIPPED_SHOWN])
        more = ", ..." if len(skipped) > _N_SKIPPED_SHOWN else ""
        log.warning(
            "%s: skipped %d invalid record(s): %s%s; first error: %s", label, len(skipped), ids, more, skipped[0]
        )
    log.info("loaded %d edit requests from %s", len(requests), label)
    return requests


def load_counterfact(
    split: str = "edit",
    n: int | None = None,
    *,
    source: str | os.PathLike = "packaged",
    shuffle_seed: int | None = None,
    on_invalid: OnInvalid = "raise",
) -> list[EditRequest]:
    """Load CounterFact edit requests.

    The packaged copy is the EasyEdit split of all 21,919 cases (edit 10,000, train 10,000,
    val 1,919; case ids are disjoint). Its schema is reduced: one rephrase and one locality
    prompt per case, and no attribute or generation prompts, so ROME's essence and
    fluency metrics need ROME's ``counterfact.json`` (not packaged) passed as a path or
    ``hf:azhx/counterfact`` (splits ``train`` 19,728 and ``test`` 2,191). All packaged
    records pass validation.

    Mapping. EasyEdit: ``prompt``, ``subject``, ``target_new``, ``ground_truth`` ->
    ``target_true``, ``rephrase_prompt`` -> ``rephrase_prompts``, ``locality_prompt`` /
    ``locality_ground_truth`` -> ``locality_prompts`` / ``locality_answers``, ``case_id``.
    ROME (detected by ``requested_rewrite``): ``prompt.format(subject)``, ``paraphrase_prompts``
    -> ``rephrase_prompts``, ``neighborhood_prompts`` -> ``locality_prompts`` each answered by
    ``target_true``; ``relation_id``, target ids, ``pararel_idx``, ``attribute_prompts`` and
    ``generation_prompts`` go to ``metadata``.

    Args:
        split: ``edit``, ``train`` or ``val`` for the packaged copy; the Hub split name for
            ``hf:`` sources; ignored for a local file.
        n: keep the first ``n`` valid records (after shuffling, if any); None keeps all.
        source: ``"packaged"``, a path to a JSON / JSON-lines file in EasyEdit or ROME
            format, or ``"hf:<dataset id>[@<revision>]"`` (ROME format).
        shuffle_seed: if given, permute all records with ``numpy.random.default_rng(seed)``
            before taking ``n``.
        on_invalid: ``"raise"`` an :class:`InvalidRequestError` at the first malformed
            record, or ``"skip"`` malformed records with one logged warning.

    Returns:
        The edit requests, in file order (or permuted order).

    Raises:
        ValueError: unknown packaged split, bad ``n`` or ``on_invalid``.
        FileNotFoundError: ``source`` is neither known nor an existing file.
        InvalidRequestError: a record is malformed; the message gives the source, the record
            index and case id, and the field.
    """
    src = _resolve("counterfact", split, source)
    records = _read_records(src, split)
    mapping = _from_rome if src.kind == "hub" else _detect_counterfact(records)
    return _convert(records, mapping, src.label, n, shuffle_seed, on_invalid)


def load_zsre(
    split: str = "eval",
    n: int | None = None,
    *,
    source: str | os.PathLike = "packaged",
    shuffle_seed: int | None = None,
    on_invalid: OnInvalid = "raise",
) -> list[EditRequest]:
    """Load zsRE edit requests from MEND-format records.

    Packaged: ``eval`` is the first 1,000 of the 19,086 records of ``zsre_mend_eval.json``
    (a prefix, in upstream order); ``train`` is a 1,000-record subset of the training file
    chosen upstream. ``case_id`` is the record's index in its file.

    Mapping (as EasyEdit's zsRE loader): ``src`` -> ``prompt``, ``subject``, ``alt`` ->
    ``target_new``, ``answers[0]`` -> ``target_true``, ``rephrase`` -> ``rephrase_prompts``,
    ``loc`` -> ``locality_prompts`` (kept with its ``"nq question: "`` prefix), ``loc_ans`` ->
    ``locality_answers``; ``pred``, ``cond`` and ``answers`` go to ``metadata``. ROME and
    MEMIT's own zsRE loaders instead edit towards ``answers[0]`` and ignore ``alt``.

    Data quality of the packaged files (measured): every ``subject`` occurs verbatim,
    case-sensitively, in its ``src``. Exactly 2 records per split fail validation because
    ``alt`` is empty (eval: records 54 and 103; train: 534 and 723; all "gender" questions),
    so loading a whole split needs ``on_invalid="skip"`` (998 requests each). A further 19
    eval and 10 train records have ``alt`` with a leading space (e.g. ``" species"``); it is
    stripped, and the raw value stays visible in ``metadata["cond"]``. 29 eval and 22 train
    records list more than one answer; only the first becomes ``target_true``.

    Args:
        split: ``eval`` or ``train`` for the packaged copy; the Hub split name for ``hf:``
            sources; ignored for a local file.
        n: keep the first ``n`` valid records (after shuffling, if any); None keeps all.
        source: ``"packaged"``, a path to a JSON / JSON-lines file, or
            ``"hf:<dataset id>[@<revision>]"`` with MEND-format rows.
        shuffle_seed: if given, permute all records with ``numpy.random.default_rng(seed)``
            before taking ``n``.
        on_invalid: ``"raise"`` at the first malformed record, or ``"skip"`` them with one
            logged warning.

    Returns:
        The edit requests, in file order (or permuted order).

    Raises:
        ValueError: unknown packaged split, bad ``n`` or ``on_invalid``.
        FileNotFoundError: ``source`` is neither known nor an existing file.
        InvalidRequestError: a record is malformed (see :func:`load_counterfact`).
    """
    src = _resolve("zsre", split, source)
    return _convert(_read_records(src, split), _from_mend, src.label, n, shuffle_seed, on_invalid)


def data_checksums(dataset: str, split: str, source: str | os.PathLike = "packaged") -> dict[str, str]:
    """Identify the bytes a load with the same arguments reads, for a run manifest.

    Args:
        dataset: ``"counterfact"`` or ``"zsre"``.
        split: as passed to the loader.
        source: as passed to the loader.

    Returns:
        ``{name: digest}``. Packaged: the manifest path (as in ``MANIFEST.sha256`` and
        ``shared/data/MANIFEST.sha256``) and the SHA-256 of its uncompressed bytes. Local
        file: the resolved path and the SHA-256 of the file. Hub: ``"hf:<id>"`` and the
        pinned revision, or ``"unpinned"`` when the source gave none (pin with
        ``hf:<id>@<revision>`` for reproducible runs).
    """
    src = _resolve(dataset, split, source)
    if src.kind == "packaged":
        return {src.location: resources.checksum(src.location)}
    if src.kind == "file":
        return {src.location: resources.sha256_file(src.location)}
    return {f"hf:{src.location}": src.revision or "unpinned"}

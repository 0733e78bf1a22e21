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

A registry names the packaged edit datasets (:func:`list_edit_datasets`,
:func:`edit_dataset`): each :class:`EditDataset` says how a study loads it
(:func:`load_edit_requests`), which splits exist, and what trained editors fit on
and which files identify that training data. The record formats live in
:mod:`editkit.record_formats`.

Nothing is read at import time; :mod:`datasets` (Hugging Face) is imported only for
``hf:`` sources.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from editkit import resources
from editkit.record_formats import detect_counterfact, from_mend, from_rome
from editkit.types import EditRequest, InvalidRequestError

__all__ = [
    "load_counterfact",
    "load_zsre",
    "data_checksums",
    "EditDataset",
    "edit_dataset",
    "list_edit_datasets",
    "load_edit_requests",
]

log = logging.getLogger(__name__)

OnInvalid = Literal["raise", "skip"]

_PACKAGED: dict[str, dict[str, str]] = {
    "counterfact": {
        split: f"counterfact/easyedit_format/counterfact-{split}.json" for split in ("edit", "train", "val")
    },
    "zsre": {"eval": "zsre/zsre_mend_eval.first1000.json", "train": "zsre/zsre_mend_train-1k.json"},
}
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
    mapping = from_rome if src.kind == "hub" else detect_counterfact(records)
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
    return _convert(_read_records(src, split), from_mend, src.label, n, shuffle_seed, on_invalid)


def data_checksums(dataset: str, split: str, source: str | os.PathLike = "packaged") -> dict[str, str]:
    """Identify the bytes a load with the same arguments reads, for a run manifest.

    Args:
        dataset: a name of :func:`list_edit_datasets`.
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


# The registry of edit datasets

TrainVal = tuple[list[EditRequest], list[EditRequest]]


@dataclass(frozen=True)
class EditDataset:
    """A packaged edit dataset: how an edit study loads it and how trained editors train on it.

    Attributes:
        name: the registry name (a study's ``dataset``, ``train_data`` of MEND and SERAC).
        loader: :func:`load_counterfact` or :func:`load_zsre`, called as
            ``loader(split, n, shuffle_seed=..., on_invalid=...)``.
        splits: the packaged split names.
        eval_split: the split edit studies draw their requests from.
        train_val: ``(n_train, n_val) -> (train, val)``, the requests trained editors fit
            and validate on (``None`` takes every record of a part).
        training_splits: the splits whose files identify the training data
            (:meth:`training_checksums`, the digest in a trained artifact's name).
    """

    name: str
    loader: Callable[..., list[EditRequest]]
    splits: tuple[str, ...]
    eval_split: str
    train_val: Callable[[int | None, int | None], TrainVal]
    training_splits: tuple[str, ...]

    def requests(self, split: str, n: int | None = None, *, shuffle_seed: int | None = None,
                 on_invalid: OnInvalid = "raise") -> list[EditRequest]:
        """The first ``n`` requests of packaged ``split`` (``on_invalid`` as in :func:`load_counterfact`)."""
        return self.loader(split, n, shuffle_seed=shuffle_seed, on_invalid=on_invalid)

    def training_checksums(self) -> dict[str, str]:
        """:func:`data_checksums` of every training split, merged (reads no records)."""
        sums: dict[str, str] = {}
        for split in self.training_splits:
            sums.update(data_checksums(self.name, split))
        return sums


def _counterfact_train_val(n_train: int | None, n_val: int | None) -> TrainVal:
    """EasyEdit's train (10,000) and val (1,919) splits."""
    return load_counterfact("train", n_train), load_counterfact("val", n_val)


_ZSRE_N_TRAIN = 900


def _zsre_train_val(n_train: int | None, n_val: int | None) -> TrainVal:
    """The packaged 1,000-record train subset split 900 / 100 (records with an empty target skipped)."""
    records = load_zsre("train", on_invalid="skip")
    return records[:_ZSRE_N_TRAIN][:n_train], records[_ZSRE_N_TRAIN:][:n_val]


_EDIT_DATASETS: dict[str, EditDataset] = {
    dataset.name: dataset
    for dataset in (
        EditDataset("counterfact", load_counterfact, tuple(_PACKAGED["counterfact"]), "edit",
                    _counterfact_train_val, ("train", "val")),
        EditDataset("zsre", load_zsre, tuple(_PACKAGED["zsre"]), "eval", _zsre_train_val, ("train",)),
    )
}


def list_edit_datasets() -> list[str]:
    """Names of the registered edit datasets, sorted."""
    return sorted(_EDIT_DATASETS)


def edit_dataset(name: str) -> EditDataset:
    """The registered edit dataset ``name``.

    Raises:
        ValueError: ``name`` is not registered; the message lists the known names and
            suggests close matches.
    """
    try:
        return _EDIT_DATASETS[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), list(_EDIT_DATASETS), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"unknown edit dataset {name!r}{hint} (known: {', '.join(list_edit_datasets())})"
        ) from None


def load_edit_requests(name: str, split: str, n: int | None, *, shuffle_seed: int | None = None,
                       on_invalid: OnInvalid = "raise") -> list[EditRequest]:
    """The first ``n`` edit requests of packaged split ``split`` of dataset ``name``.

    A malformed record raises :class:`~editkit.types.InvalidRequestError` naming it;
    with ``on_invalid="skip"`` it is left out with one logged warning (packaged zsRE has
    two empty targets per split), so a caller asking for ``n`` should check how many came.

    Args:
        name: a name of :func:`list_edit_datasets`.
        split: a packaged split of that dataset (``EditDataset.splits``).
        n: how many requests; None takes every valid record.
        shuffle_seed: if given, permute all records with ``numpy.random.default_rng(seed)`` first.
        on_invalid: ``"raise"`` (default) or ``"skip"``.

    Raises:
        ValueError: unknown dataset or split.
        InvalidRequestError: a malformed record, with ``on_invalid="raise"``.
    """
    return edit_dataset(name).requests(split, n, shuffle_seed=shuffle_seed, on_invalid=on_invalid)

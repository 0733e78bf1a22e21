"""How raw CounterFact and zsRE records map to :class:`EditRequest` (used by :mod:`editkit.datasets`).

Three record formats: EasyEdit's CounterFact (:func:`from_easyedit`), ROME's
``counterfact.json`` (:func:`from_rome`) and MEND's zsRE (:func:`from_mend`). Each
mapping takes one raw record, its index in the file and a label naming the source,
and raises :class:`InvalidRequestError` naming the record and the offending field.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .types import EditRequest, InvalidRequestError

__all__ = ["RecordFields", "from_easyedit", "from_rome", "from_mend", "detect_counterfact"]

_MISSING = object()


# Record access shared by the three mappings


class RecordFields:
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


def from_easyedit(record: Any, index: int, label: str = "record") -> EditRequest:
    """EasyEdit CounterFact: prompt, subject, target_new, ground_truth, rephrase/locality fields."""
    f = RecordFields(record, index, label)
    return f.request(
        prompt=f.text("prompt"),
        subject=f.text("subject"),
        target_new=f.target("target_new"),
        target_true=f.target("ground_truth", None),
        rephrase_prompts=f.texts("rephrase_prompt"),
        locality_prompts=f.texts("locality_prompt"),
        locality_answers=tuple(a.strip() for a in f.texts("locality_ground_truth")),
    )


def from_rome(record: Any, index: int, label: str = "record") -> EditRequest:
    """ROME ``counterfact.json`` (also the Hub export ``azhx/counterfact``).

    Neighbourhood prompts share the subject's true object, so each gets ``target_true`` as
    its locality answer, as in ROME's neighbourhood score.
    """
    f = RecordFields(record, index, label)
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


def from_mend(record: Any, index: int, label: str = "record") -> EditRequest:
    """MEND-format zsRE: src, subject, alt, answers, rephrase, loc, loc_ans (pred, cond kept)."""
    f = RecordFields(record, index, label, case_id=index)
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


def detect_counterfact(records: Sequence[Any]) -> Callable[[Any, int, str], EditRequest]:
    """ROME records carry ``requested_rewrite``; anything else is read as EasyEdit format."""
    first = records[0] if records else {}
    return from_rome if isinstance(first, Mapping) and "requested_rewrite" in first else from_easyedit

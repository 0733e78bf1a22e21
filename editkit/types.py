"""Shared value types: the edit request and its validation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["EditRequest", "InvalidRequestError"]


class InvalidRequestError(ValueError):
    """An edit request (or the record it came from) is malformed."""


@dataclass(frozen=True)
class EditRequest:
    """One fact to write into a model.

    Attributes:
        prompt: the edit prompt as plain text; it contains ``subject`` verbatim,
            e.g. ``"The mother tongue of Danielle Darrieux is"``.
        subject: the entity whose fact changes, e.g. ``"Danielle Darrieux"``.
        target_new: the new object, without a leading space (``"English"``).
        target_true: the object the unedited fact has, if known (``"French"``).
        rephrase_prompts: paraphrases of ``prompt`` (generalisation).
        locality_prompts: unrelated prompts whose answers must not change.
        locality_answers: the reference answer of each locality prompt, if known.
        case_id: the record's identifier in its source dataset.
        metadata: anything else the source record carried.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    rephrase_prompts: tuple[str, ...] = ()
    locality_prompts: tuple[str, ...] = ()
    locality_answers: tuple[str, ...] = ()
    case_id: Any = None
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        where = f"edit request {self.case_id!r}" if self.case_id is not None else "edit request"
        for name in ("prompt", "subject", "target_new"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise InvalidRequestError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
            if not value.strip():
                raise InvalidRequestError(f"{where}: field {name!r} is empty")
        if self.target_true is not None and not isinstance(self.target_true, str):
            raise InvalidRequestError(f"{where}: field 'target_true' must be a string or None")
        if self.subject not in self.prompt:
            raise InvalidRequestError(
                f"{where}: subject {self.subject!r} does not occur verbatim in prompt {self.prompt!r}"
            )
        for name in ("rephrase_prompts", "locality_prompts", "locality_answers"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            value = tuple(value)
            if not all(isinstance(v, str) and v.strip() for v in value):
                raise InvalidRequestError(f"{where}: field {name!r} must hold non-empty strings")
            object.__setattr__(self, name, value)
        if self.locality_answers and len(self.locality_answers) != len(self.locality_prompts):
            raise InvalidRequestError(
                f"{where}: {len(self.locality_answers)} locality_answers for "
                f"{len(self.locality_prompts)} locality_prompts"
            )

    @property
    def prompt_template(self) -> str:
        """``prompt`` with the first occurrence of the subject replaced by ``{}``.

        Braces already in the prompt are escaped so ``template.format(subject)``
        gives back ``prompt``.
        """
        escaped = self.prompt.replace("{", "{{").replace("}", "}}")
        subject = self.subject.replace("{", "{{").replace("}", "}}")
        return escaped.replace(subject, "{}", 1)

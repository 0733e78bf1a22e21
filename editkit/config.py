"""Frozen hyperparameter dataclasses with strict loading.

Every editor's hyperparameters subclass :class:`Params`. Defaults are the published
values; YAML files and keyword overrides may only name declared fields. An unknown
key is an error naming the closest declared ones, and values are coerced to the
declared type (``"0.5"`` -> ``0.5``, ``[13, 14]`` -> ``(13, 14)``). ``digest()`` is
stored with every result so a number can always be traced to its settings.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import typing
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

if TYPE_CHECKING:
    from .models import LoadedModel
    from .modelinfo import ModelInfo

__all__ = ["Params", "UnknownParameterError", "load_yaml", "check_keys", "model_overrides", "packaged_params",
           "option"]

P = TypeVar("P", bound="Params")


class UnknownParameterError(KeyError, ValueError):
    """A configuration names a key that the target does not declare."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def check_keys(given: typing.Iterable[str], known: typing.Iterable[str], where: str) -> None:
    """Raise :class:`UnknownParameterError` if ``given`` holds a key not in ``known``."""
    known = list(known)
    for key in given:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise UnknownParameterError(
                f"unknown key {key!r} in {where}{hint} (known: {', '.join(sorted(known))})"
            )


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping (an empty file is an empty mapping)."""
    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def model_overrides(name: str, lm: LoadedModel | ModelInfo) -> dict[str, Any]:
    """Packaged per-model overrides for editor ``name`` (empty if none).

    ``editkit/configs/<name>.yaml`` keys them under ``models`` by the model's catalog
    name or hub id, else under ``model_types`` by its ``config.model_type``.
    """
    path = resources.files("editkit") / "configs" / f"{name.lower()}.yaml"
    if not path.is_file():
        return {}
    table = load_yaml(str(path))
    by_model = (table.get("models") or {}).get(lm.name)
    if by_model is not None:
        return dict(by_model)
    return dict((table.get("model_types") or {}).get(lm.model_type) or {})


def packaged_params(cls: type[P], name: str, lm: LoadedModel | ModelInfo) -> P:
    """``cls``'s published defaults with editor ``name``'s packaged overrides for ``lm``."""
    return cls().replace(where=f"editkit/configs/{name}.yaml", **model_overrides(name, lm))


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name)
            except (TypeError, ValueError) as error:
                errors.append(str(error))
        raise ValueError(f"parameter {name!r}: cannot read {value!r} as {annotation}")
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, typing.Iterable):
            value = (value,)
        item = args[0] if args else Any
        return tuple(_coerce(v, item, name) for v in value)
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"parameter {name!r}: {value!r} is not one of {args}")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(f"parameter {name!r}: {value!r} is not a boolean")
    if annotation is int:
        if isinstance(value, bool):
            raise ValueError(f"parameter {name!r}: {value!r} is not an integer")
        number = float(value) if isinstance(value, str) else value
        if isinstance(number, float) and not number.is_integer():
            raise ValueError(f"parameter {name!r}: {value!r} is not an integer")
        return int(number)
    if annotation is float:
        if isinstance(value, bool):
            raise ValueError(f"parameter {name!r}: {value!r} is not a number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ValueError(f"parameter {name!r}: {value!r} is not a string")
        return value
    return value


def option(default: Any) -> Any:
    """A field added to an existing ``Params`` class after results were recorded with it.

    It enters :meth:`Params.digest` only when set to something other than ``default``,
    so every earlier run id (``<method>-<digest of the params>``) stays what it was.
    """
    return dataclasses.field(default=default, metadata={"digest_when_set": True})


@dataclasses.dataclass(frozen=True)
class Params:
    """Base class: subclasses are frozen dataclasses of hyperparameters."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls: type[P], values: Mapping[str, Any], where: str | None = None) -> P:
        """Build from a mapping of overrides on top of the defaults (strict)."""
        return cls().replace(where=where, **dict(values))

    @classmethod
    def from_yaml(cls: type[P], path: str | Path) -> P:
        return cls.from_dict(load_yaml(path), where=str(path))

    def replace(self: P, where: str | None = None, **overrides: Any) -> P:
        """A copy with ``overrides`` applied; unknown keys and bad values raise."""
        check_keys(overrides, self.field_names(), where or f"{type(self).__name__} overrides")
        hints = typing.get_type_hints(type(self))
        coerced = {}
        for key, value in overrides.items():
            try:
                coerced[key] = _coerce(value, hints[key], key)
            except (TypeError, ValueError) as error:
                message = str(error) if str(error).startswith("parameter") else f"parameter {key!r}: {error}"
                raise ValueError(f"{message} (in {where or type(self).__name__})") from None
        return dataclasses.replace(self, **coerced)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def digest(self) -> str:
        """Short stable hash of the class name and every value (an :func:`option` only when set)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if not (f.metadata.get("digest_when_set") and getattr(self, f.name) == f.default)}
        payload = json.dumps([type(self).__name__, values], sort_keys=True, default=list)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

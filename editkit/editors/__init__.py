"""Editor registry: names map lazily to classes so ``import editkit`` stays cheap.

``get_editor(name, lm, **overrides)`` builds the editor's hyperparameters from the
published defaults, then the packaged per-model overrides
(``editkit/configs/<name>.yaml``: first the model's catalog name or hub id, then its
``config.model_type``), then an optional named preset from the same file (trained
editors have ``smoke`` and ``paper``), then an optional YAML file, then keyword overrides.
"""

from __future__ import annotations

import difflib
import importlib
import os
from importlib import resources
from typing import TYPE_CHECKING, Any

from ..config import load_yaml, packaged_params
from ..editing import Editor

if TYPE_CHECKING:
    from ..models import LoadedModel
    from ..modelinfo import ModelInfo

__all__ = ["get_editor", "list_editors", "editor_class", "resolve_params", "UnknownEditorError"]

_REGISTRY: dict[str, str] = {
    "rome": "editkit.editors.rome:ROME",
    "r-rome": "editkit.editors.rome:RROME",
    "memit": "editkit.editors.memit:MEMIT",
    "pmet": "editkit.editors.pmet:PMET",
    "alphaedit": "editkit.editors.alphaedit:AlphaEdit",
    "emmet": "editkit.editors.emmet:EMMET",
    "encore": "editkit.editors.encore:ENCORE",
    "kn": "editkit.editors.kn:KN",
    "grace": "editkit.editors.grace:GRACE",
    "ft": "editkit.editors.ft:FT",
    "mend": "editkit.editors.mend:MEND",
    "serac": "editkit.editors.serac:SERAC",
    "ike": "editkit.editors.ike:IKE",
    "wise": "editkit.editors.wise:WISE",
    "ultraedit": "editkit.editors.ultraedit:UltraEdit",
}


class UnknownEditorError(KeyError, ValueError):
    def __str__(self) -> str:
        return str(self.args[0])


def list_editors() -> list[str]:
    return sorted(_REGISTRY)


def editor_class(name: str) -> type[Editor]:
    key = name.lower()
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, list(_REGISTRY), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownEditorError(f"unknown editor {name!r}{hint} (known: {', '.join(list_editors())})")
    module, attr = _REGISTRY[key].split(":")
    return getattr(importlib.import_module(module), attr)


def preset_overrides(name: str, preset: str) -> dict[str, Any]:
    """The named set of values ``preset`` (e.g. ``smoke``, ``paper``) of editor ``name``'s config file."""
    path = resources.files("editkit") / "configs" / f"{name.lower()}.yaml"
    presets = (load_yaml(str(path)).get("presets") or {}) if path.is_file() else {}
    if preset not in presets:
        raise UnknownEditorError(f"editor {name!r} has no preset {preset!r} (known: {', '.join(presets) or 'none'})")
    return dict(presets[preset] or {})


def resolve_params(name: str, lm: LoadedModel | ModelInfo, config_file: str | os.PathLike[str] | None = None, *,
                   preset: str | None = None, **overrides: Any):
    """The editor's params: defaults < packaged per-model overrides < ``preset`` < ``config_file`` < ``overrides``."""
    where = f"editkit/configs/{name}.yaml"
    params = packaged_params(editor_class(name).params_class, name, lm)
    if preset is not None:
        params = params.replace(where=f"{where} preset {preset!r}", **preset_overrides(name, preset))
    if config_file is not None:
        params = params.replace(where=str(config_file), **load_yaml(config_file))
    return params.replace(**overrides)


def get_editor(name: str, lm: LoadedModel, config_file: str | os.PathLike[str] | None = None, *,
               preset: str | None = None, **overrides: Any) -> Editor:
    """Build editor ``name`` for the loaded model ``lm`` (see module docstring)."""
    cls = editor_class(name)
    return cls(lm, resolve_params(name, lm, config_file, preset=preset, **overrides))

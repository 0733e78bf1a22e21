"""What a study needs to know about a model to group results: family, size, instruct or base.

RQ2 compares base with instruction-tuned models and RQ3 compares sizes of one family,
so every cell of a study records a :class:`ModelInfo`. Each field comes from the first
of these that knows it:

1. an explicit value in the study file (``model_overrides: {name: {family: ..., instruct: ...}}``);
2. the loaded model: its exact parameter count and layer count;
3. the offline catalog (:data:`editkit.models.CATALOG`);
4. the model's ``config.json`` (``model_type``, layer count) for a local folder, or
   a hub model's config if the HuggingFace cache already holds it;
5. the name: ``-instruct``, ``-chat``, ``-it`` and ``-sft`` mark instruction-tuned
   models, as on the hub (``Llama-2-7b-chat-hf``, ``Mistral-7B-Instruct-v0.2``, ``gemma-2-2b-it``).

:func:`describe_model` needs no weights, so ``--list-cells`` stays cheap.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .models import CATALOG

if TYPE_CHECKING:
    from .models import LoadedModel

__all__ = ["ModelInfo", "describe_model", "INFO_FIELDS"]

INFO_FIELDS = ("family", "n_params", "instruct", "n_layers", "model_type")

_INSTRUCT = re.compile(r"(^|[-_./])(instruct|chat|it|sft|rlhf|dpo)([-_./]|$)", re.IGNORECASE)
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass(frozen=True)
class ModelInfo:
    """Grouping metadata of one model (``None`` where nothing knows the value).

    Attributes:
        name: the catalog name, hub id or folder, as written in the study file.
        model_type: the HuggingFace ``config.model_type`` (the adapter row).
        family: model family; a base model and its instruct version share it.
        n_params: number of parameters (exact once the model is loaded).
        instruct: instruction-tuned (``True``) or base (``False``).
        n_layers: transformer blocks.
    """

    name: str
    model_type: str | None = None
    family: str | None = None
    n_params: int | None = None
    instruct: bool | None = None
    n_layers: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _family_from_name(name: str) -> str:
    # "EleutherAI/pythia-1.4b" -> "pythia"; "meta-llama/Llama-2-7b-chat-hf" -> "llama-2"
    stem = name.rstrip("/").split("/")[-1].lower()
    match = re.match(r"[a-z]+(?:-\d+(?=[-_.]))?", stem)
    return match.group(0) if match else stem


def _config_json(name: str) -> dict[str, Any]:
    """A local folder's ``config.json``, or a hub model's config if the HF cache has it (no download)."""
    path = Path(name).expanduser() / "config.json"
    if not path.is_file():
        return _cached_hub_config(name)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable model config ({error})") from None


def _cached_hub_config(name: str) -> dict[str, Any]:
    if "/" not in name or Path(name).expanduser().exists():
        return {}
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(name, local_files_only=True).to_dict()
    except (OSError, ValueError):  # not cached here: the type is known once the model loads
        return {}


def describe_model(name: str, declared: dict[str, Any] | None = None, lm: LoadedModel | None = None) -> ModelInfo:
    """The grouping metadata of model ``name`` (see the module docstring for the order).

    Args:
        name: catalog name, hub id or local folder.
        declared: explicit values from the study file; keys among :data:`INFO_FIELDS`.
        lm: the loaded model, when there is one: gives the exact parameter and layer counts.

    Raises:
        ValueError: ``declared`` names a key that is not a metadata field.
    """
    declared = dict(declared or {})
    unknown = sorted(set(declared) - set(INFO_FIELDS))
    if unknown:
        raise ValueError(f"model metadata for {name!r} has unknown keys {unknown} (known: {', '.join(INFO_FIELDS)})")
    found: dict[str, Any] = {}
    if lm is not None:
        found["model_type"] = lm.model_type
        found["n_layers"] = lm.n_layers
        found["n_params"] = sum(p.numel() for p in lm.model.parameters())
    entry = CATALOG.get(name)
    if entry is not None:
        found.setdefault("model_type", entry.model_type or None)
        found.setdefault("n_params", entry.n_params)
        found.setdefault("n_layers", entry.n_layers)
        found["family"] = entry.family or None
        found["instruct"] = entry.instruct
    config = _config_json(name) if entry is None else {}
    if config:
        found.setdefault("model_type", config.get("model_type"))
        layers = next((config[k] for k in _LAYER_KEYS if isinstance(config.get(k), int)), None)
        found.setdefault("n_layers", layers)
    if entry is None:
        found.setdefault("family", _family_from_name(name))
        found.setdefault("instruct", bool(_INSTRUCT.search(name.rstrip("/").split("/")[-1])))
    found.update({k: v for k, v in declared.items() if v is not None})
    return ModelInfo(name=name, **{k: found.get(k) for k in INFO_FIELDS})

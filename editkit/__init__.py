"""editkit: sequential knowledge editing and what it does to a model's general abilities.

``import editkit`` is cheap: the public names below are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "EditRequest": "editkit.types:EditRequest",
    "InvalidRequestError": "editkit.types:InvalidRequestError",
    "load_model": "editkit.models:load_model",
    "LoadedModel": "editkit.models:LoadedModel",
    "get_adapter": "editkit.adapters:get_adapter",
    "get_editor": "editkit.editors:get_editor",
    "list_editors": "editkit.editors:list_editors",
    "load_counterfact": "editkit.datasets:load_counterfact",
    "load_zsre": "editkit.datasets:load_zsre",
    "evaluate": "editkit.benchmarks:evaluate",
    "aggregate": "editkit.benchmarks:aggregate",
    "edit_quality": "editkit.edit_metrics:edit_quality",
    "load_edit_requests": "editkit.datasets:load_edit_requests",
    "StudyConfig": "editkit.grid:StudyConfig",
    "run_study": "editkit.runs:run_study",
    "run_study_ray": "editkit.backends:run_study_ray",
    "load_results": "editkit.results:load_results",
    "load_study": "editkit.runs:load_study",
    "describe_model": "editkit.modelinfo:describe_model",
    "first_significant_drop": "editkit.paired:first_significant_drop",
    "mcnemar_items": "editkit.power:mcnemar_items",
    "mcnemar_power": "editkit.power:mcnemar_power",
    "paired_mean_items": "editkit.power:paired_mean_items",
    "discordance": "editkit.power:discordance",
    "decline_rate": "editkit.findings:decline_rate",
    "pair_difference": "editkit.findings:pair_difference",
    "drop_vs_scale": "editkit.findings:drop_vs_scale",
    "scale_slope": "editkit.findings:scale_slope",
    "relative_drop": "editkit.findings:relative_drop",
    "capability_drops": "editkit.findings:capability_drops",
    "capability_difference_test": "editkit.findings:capability_difference_test",
    "safety_table": "editkit.findings:safety_table",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    try:
        module, attr = _LAZY[name].split(":")
    except KeyError:
        raise AttributeError(f"module 'editkit' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

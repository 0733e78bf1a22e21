"""A study is a grid: models × methods × datasets × seeds × edit batch sizes.

One YAML file (or a notebook's ``parameters`` cell) describes the grid through
:class:`StudyConfig`. Every point of the grid is a :class:`Cell`: one sequential run,
keyed by a digest of what defines it, saved in its own folder under one results root
and resumed on its own. A single-model RQ1 file (``model: ...``, ``dataset: ...``,
``seed: ...``) is a grid with one point on each of those axes, and its cells keep the
folder names they had before the grid existed, so old runs resume.

Overrides:

* ``editor_overrides: {method: {hyperparameter: value}}`` applies to every model;
* ``model_overrides: {model: {dtype, device, family, instruct, n_params, n_layers,
  editor_overrides: {method: {...}}}}`` applies to one model, over the above.

Health (:mod:`editkit.health`): with ``health: true`` (the default) every checkpoint also
records held-out perplexity (``heldout_chunks`` chunks of ``heldout_source``) and the
changed weights' statistics. ``health_alarm: {max_ppl_ratio: 100}`` (any field of
:class:`editkit.health.HealthAlarm`) stops a cell at the first checkpoint that crosses a
threshold; the stop is saved as a collapse with its reason.

Tasks: editkit's registered tasks (:func:`editkit.benchmarks.list_tasks`) and any
lm-evaluation-harness task as ``lm_eval:<name>`` (:mod:`editkit.lm_eval_tasks`), whose
YAMLs may also come from the folder ``lm_eval_include``. An unknown name of either kind
is an error here, before any edit.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from .config import Params, check_keys
from .modelinfo import INFO_FIELDS

if TYPE_CHECKING:
    from .health import HealthAlarm

__all__ = ["StudyConfig", "Cell", "DEFAULT_CHECKPOINTS", "DEFAULT_MODEL_NAME", "DEFAULT_TASKS", "PANEL_LIMITS"]

DEFAULT_CHECKPOINTS = (0, 1, 5, 10, 20, 50, 100, 200, 500, 1000)
# The default panel: the packaged tasks on which the embedded model scores well above
# chance (README, "A default panel with headroom"), with item counts from a power
# calculation (editkit.power): 350 cloze-CommonsenseQA items detect a 5-point paired
# accuracy drop with 80% power by editkit's exact McNemar test when up to 10% of the
# items change (mcnemar_items(0.05, 0.10) = 312, plus 10% for the exact test's
# conservatism). Cloze MMLU costs about 6x more per item and sits closer to chance; its
# 114 items (two per subject) are read through the paired log-likelihood change.
PANEL_LIMITS = {"commonsense_qa_cloze": 350, "mmlu_cloze": 114}
DEFAULT_TASKS = tuple(PANEL_LIMITS)
AUTO_LIMIT = 57  # ``limit: auto`` for a task outside the panel: one MMLU item per subject
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
_MODEL_OVERRIDE_KEYS = ("dtype", "device", "editor_overrides", *INFO_FIELDS)
# Fields that define what a cell measures. n_edits and checkpoints are left out on purpose:
# asking for more edits or other checkpoints later extends the same run.
_EVALUATION_FIELDS = ("shuffle_seed", "tasks", "max_new_tokens", "n_generation_examples")


@dataclass(frozen=True)
class StudyConfig(Params):
    """Everything a sequential-editing study needs; strict like every :class:`Params`.

    Grid axes are lists (``models``, ``methods``, ``datasets``, ``seeds``,
    ``edit_batch_size``); ``model``, ``dataset`` and ``seed`` are the one-value
    spellings of RQ1 files and may not be combined with their lists.
    ``invalid_records: skip`` leaves malformed edit records out (with a warning; the
    edited case ids are in each cell's manifest) instead of stopping with an error that
    names the record: packaged zsRE has an empty target at records 54 and 103.
    """

    # The one-value spellings of RQ1 files; a notebook declares the lists instead.
    LEGACY_FIELDS: ClassVar[tuple[str, ...]] = ("model", "dataset", "seed")

    models: tuple[str, ...] = ()
    model: str | None = None
    methods: tuple[str, ...] = ("rome",)
    datasets: tuple[str, ...] = ()
    dataset: str | None = None
    seeds: tuple[int, ...] = ()
    seed: int | None = None
    edit_batch_size: tuple[int, ...] = (1,)
    shuffle_edits: bool = False
    invalid_records: Literal["raise", "skip"] = "raise"
    editor_overrides: Any = None
    model_overrides: Any = None
    split: str | None = None
    n_edits: int = 10
    checkpoints: tuple[int, ...] = ()
    tasks: tuple[str, ...] = DEFAULT_TASKS
    lm_eval_include: str | None = None
    limit: int | Literal["auto"] | None = "auto"
    task_limits: Any = None
    max_new_tokens: int = 256
    shuffle_seed: int | None = None
    batch_size: int | Literal["auto"] = 8
    device: str = "cpu"
    dtype: str = "float32"
    n_generation_examples: int = 3
    health: bool = True
    heldout_source: Literal["packaged", "wikitext"] = "packaged"
    heldout_chunks: int = 32
    health_alarm: Any = None
    results_dir: str = "results/study"

    def __post_init__(self) -> None:
        from .datasets import edit_dataset, list_edit_datasets
        from .editors import editor_class

        for one, many in (("model", "models"), ("dataset", "datasets"), ("seed", "seeds")):
            if getattr(self, one) is not None and getattr(self, many):
                raise ValueError(f"give either {one!r} or {many!r}, not both")
        if not self.edit_batch_size:
            raise ValueError("edit_batch_size is empty: give at least one size (1 edits one fact at a time)")
        for name in ("models", "methods", "datasets", "seeds", "edit_batch_size", "tasks"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"{name} lists a value twice: {list(values)}")
        if self.n_edits < 0:
            raise ValueError(f"n_edits must be >= 0, got {self.n_edits}")
        if not self.methods:
            raise ValueError("methods is empty")
        for method in self.methods:
            batch_edits = editor_class(method).batch_edits  # an unknown name raises here, naming close ones
            if max(self.edit_batch_size) > 1 and not batch_edits:
                raise ValueError(f"{method} edits one request at a time; edit_batch_size > 1 needs methods that "
                                 "edit a batch at once (memit, pmet, alphaedit, ft, mend, serac)")
        self._check_tasks()
        known = list_edit_datasets()
        for dataset in self.dataset_list():
            if dataset not in known:
                raise ValueError(f"unknown dataset {dataset!r} (known: {', '.join(known)})")
            splits = edit_dataset(dataset).splits
            if self.split is not None and self.split not in splits:
                raise ValueError(f"split {self.split!r} is not a split of {dataset} ({', '.join(splits)}); "
                                 "leave split out to use each dataset's evaluation split")
        if self.shuffle_edits and self.shuffle_seed is not None:
            raise ValueError("shuffle_edits shuffles with each cell's seed; drop shuffle_seed (a fixed shuffle)")
        for size in self.edit_batch_size:
            if size < 1:
                raise ValueError(f"edit_batch_size must be >= 1, got {size}")
            if self.n_edits % size:
                raise ValueError(f"n_edits={self.n_edits} is not a multiple of edit_batch_size={size}")
            uneven = [c for c in self.checkpoints if c % size]
            if uneven:
                raise ValueError(f"checkpoints {uneven} are not multiples of edit_batch_size={size}: a checkpoint "
                                 "must fall between two batches")
        bad = [c for c in self.checkpoints if not 0 <= c <= self.n_edits]
        if bad:
            raise ValueError(f"checkpoints {bad} fall outside 0..n_edits={self.n_edits}")
        for name in ("editor_overrides", "task_limits", "model_overrides"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Mapping):
                raise ValueError(f"{name} must be a mapping or None, got {type(value).__name__}")
        self._check_editor_overrides(self.editor_overrides, "editor_overrides")
        for model, values in (self.model_overrides or {}).items():
            if model not in self.model_list():
                raise ValueError(f"model_overrides names {model!r}, which is not in models {self.model_list()}")
            if not isinstance(values, Mapping):
                raise ValueError(f"model_overrides[{model!r}] must be a mapping, got {type(values).__name__}")
            check_keys(values, _MODEL_OVERRIDE_KEYS, f"model_overrides[{model!r}]")
            self._check_editor_overrides(values.get("editor_overrides"), f"model_overrides[{model!r}].editor_overrides")
        for task in self.task_limits or {}:
            if task not in self.tasks:
                raise ValueError(f"task_limits names {task!r}, which is not in tasks {self.tasks}")
        if isinstance(self.limit, int) and self.limit < 1 or self.max_new_tokens < 1:
            raise ValueError("limit and max_new_tokens must be positive")
        if self.batch_size != "auto" and self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer or 'auto', got {self.batch_size}")
        if self.heldout_chunks < 1:
            raise ValueError(f"heldout_chunks must be positive, got {self.heldout_chunks}")
        if self.health_alarm is not None and not self.health:
            raise ValueError("health_alarm needs health: true (the alarm reads the health measurements)")
        self.alarm()  # an unknown threshold or a bad value raises here

    def _check_tasks(self) -> None:
        from .benchmarks import get_task
        from .lm_eval_tasks import check_task, is_lm_eval_task

        lm_eval_tasks = [task for task in self.tasks if is_lm_eval_task(task)]
        if self.lm_eval_include is not None and not lm_eval_tasks:
            raise ValueError(f"lm_eval_include is set but no task is an lm-eval task (lm_eval:<name>): {self.tasks}")
        for task in self.tasks:
            if task in lm_eval_tasks:
                check_task(task, self.lm_eval_include)  # imports lm-eval and indexes its tasks (seconds)
            else:
                get_task(task)

    def alarm(self) -> HealthAlarm | None:
        """The :class:`~editkit.health.HealthAlarm` of ``health_alarm`` (None: never stop a cell early)."""
        from .health import HealthAlarm

        if self.health_alarm is None:
            return None
        if not isinstance(self.health_alarm, Mapping):
            raise ValueError(f"health_alarm must be a mapping such as {{max_ppl_ratio: 100}}, "
                             f"got {type(self.health_alarm).__name__}")
        known = [f.name for f in fields(HealthAlarm)]
        check_keys(self.health_alarm, known, "health_alarm")
        # Thresholds not named are off: the alarm checks only what the study asks for.
        return HealthAlarm(**{name: self.health_alarm.get(name) for name in known})

    @classmethod
    def from_parameters(cls, namespace: Mapping[str, Any], where: str = "notebook parameters") -> StudyConfig:
        """Build from a notebook's namespace (``globals()``): every study field defined there.

        Names that are not study fields (imports, other variables) are ignored; the
        values are checked as strictly as :meth:`from_dict` checks a YAML file.
        """
        return cls.from_dict({name: namespace[name] for name in cls.field_names() if name in namespace}, where=where)

    def _check_editor_overrides(self, overrides: Any, where: str) -> None:
        if overrides is None:
            return
        if not isinstance(overrides, Mapping):
            raise ValueError(f"{where} must be a mapping of method -> hyperparameters")
        for method, values in overrides.items():
            if method not in self.methods:
                raise ValueError(f"{where} names {method!r}, which is not in methods {self.methods}")
            if values is not None and not isinstance(values, Mapping):
                raise ValueError(f"{where}[{method!r}] must be a mapping of hyperparameters")

    # -- the axes -------------------------------------------------------------------
    def model_list(self) -> list[str]:
        return list(self.models) or [self.model or DEFAULT_MODEL_NAME]

    def dataset_list(self) -> list[str]:
        return list(self.datasets) or [self.dataset or "counterfact"]

    def seed_list(self) -> list[int]:
        return list(self.seeds) or [0 if self.seed is None else self.seed]

    def checkpoint_list(self, edit_batch_size: int = 1) -> list[int]:
        """Sorted checkpoints; the defaults up to ``n_edits`` that fall between batches, and ``n_edits``."""
        if self.checkpoints:
            points = set(self.checkpoints)
        else:
            points = {c for c in DEFAULT_CHECKPOINTS if c <= self.n_edits and c % edit_batch_size == 0}
        return sorted(points | {self.n_edits})

    def task_limit(self, task: str) -> int | None:
        """Items of ``task``: its ``task_limits`` entry, else ``limit`` (``auto``: :data:`PANEL_LIMITS`, else 57)."""
        if task in (self.task_limits or {}):
            return self.task_limits[task]
        if self.limit == "auto":
            return PANEL_LIMITS.get(task, AUTO_LIMIT)
        return self.limit

    def cells(self) -> list[Cell]:
        """Every point of the grid, model-major so that one model serves consecutive cells."""
        return list(self._iter_cells())

    def _iter_cells(self) -> Iterator[Cell]:
        index = 0
        for model in self.model_list():
            per_model = dict((self.model_overrides or {}).get(model) or {})
            model_editor = per_model.get("editor_overrides") or {}
            for dataset in self.dataset_list():
                for seed in self.seed_list():
                    for size in self.edit_batch_size:
                        for method in self.methods:
                            overrides = {**((self.editor_overrides or {}).get(method) or {}),
                                         **(model_editor.get(method) or {})}
                            yield Cell(index=index, study=self, model=model, method=method, dataset=dataset,
                                       seed=seed, edit_batch_size=size, editor_overrides=overrides,
                                       dtype=per_model.get("dtype", self.dtype),
                                       device=per_model.get("device", self.device),
                                       declared_info={k: per_model[k] for k in INFO_FIELDS if k in per_model})
                            index += 1


@dataclass(frozen=True)
class Cell:
    """One point of a study grid: one sequential run of one method on one model.

    Attributes:
        index: position in :meth:`StudyConfig.cells` (``--cell I``).
        study: the study it belongs to (evaluation settings, n_edits, checkpoints).
        model, method, dataset, seed, edit_batch_size: the grid coordinates.
        editor_overrides: hyperparameters over the packaged defaults (per method,
            then per model and method).
        dtype, device: how the model is loaded for this cell.
        declared_info: model metadata given in the study file.
    """

    index: int
    study: StudyConfig = field(repr=False)
    model: str
    method: str
    dataset: str
    seed: int
    edit_batch_size: int
    editor_overrides: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    device: str = "cpu"
    declared_info: dict[str, Any] = field(default_factory=dict)

    def axes(self) -> dict[str, Any]:
        """The grid coordinates, as columns of every results frame."""
        return {"model": self.model, "method": self.method, "dataset": self.dataset, "seed": self.seed,
                "edit_batch_size": self.edit_batch_size}

    def identity(self) -> dict[str, Any]:
        """What defines the cell's measurements, except the editor's resolved hyperparameters.

        The keys and values of a batch-size-1, unshuffled cell are those of the
        single-model runs before the grid, so their folders keep their names.
        """
        study = self.study
        identity: dict[str, Any] = {name: getattr(study, name) for name in _EVALUATION_FIELDS}
        identity.update(split=self.split(), model=self.model, dataset=self.dataset, seed=self.seed, dtype=self.dtype)
        identity["limits"] = {task: study.task_limit(task) for task in study.tasks}
        if self.edit_batch_size != 1:
            identity["edit_batch_size"] = self.edit_batch_size
        if study.shuffle_edits:
            identity["shuffle_edits"] = True
        if study.invalid_records == "skip":  # which records are edited changes
            identity["invalid_records"] = "skip"
        # Health settings enter only when they differ from the defaults, so runs from before
        # health existed keep their folders (and gain health rows at new checkpoints).
        if not study.health:
            identity["health"] = False
        if study.heldout_source != "packaged" or study.heldout_chunks != 32:
            identity["heldout"] = [study.heldout_source, study.heldout_chunks]
        if study.health_alarm is not None:  # an alarm changes where the run stops
            identity["health_alarm"] = dict(study.health_alarm)
        if study.lm_eval_include is not None:  # where lm_eval:<task> YAMLs are read from
            identity["lm_eval_include"] = study.lm_eval_include
        return identity

    def run_id(self, editor_params_digest: str) -> str:
        """``<method>-<digest>``: the digest covers everything but n_edits and checkpoints."""
        payload = json.dumps([self.method, editor_params_digest, self.identity()], sort_keys=True, default=list)
        return f"{self.method}-{hashlib.sha256(payload.encode()).hexdigest()[:10]}"

    def unedited_key(self) -> str:
        """What the cell's checkpoint 0 depends on: equal keys mean identical unedited measurements.

        Everything of :meth:`identity` but the batch size (no edit is applied at 0), and the
        device. The method and its hyperparameters are not part of it.
        """
        identity = {k: v for k, v in self.identity().items() if k != "edit_batch_size"}
        payload = json.dumps([identity, self.device], sort_keys=True, default=list)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def checkpoints(self) -> list[int]:
        return self.study.checkpoint_list(self.edit_batch_size)

    def split(self) -> str:
        """The split edited: the study's ``split``, else the dataset's evaluation split."""
        from .datasets import edit_dataset

        return self.study.split or edit_dataset(self.dataset).eval_split

    def limits(self) -> tuple[tuple[str, int | None], ...]:
        return tuple((task, self.study.task_limit(task)) for task in self.study.tasks)

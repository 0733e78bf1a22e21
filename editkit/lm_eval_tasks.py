"""lm-evaluation-harness tasks in a study: ``tasks: [lm_eval:<task>]``, measured at every checkpoint.

A study's ``tasks`` may name any lm-eval task, group or tag as ``lm_eval:<name>``
(``lm_eval:hellaswag``, ``lm_eval:mmlu``). Task YAMLs outside lm-eval's own come
from the study's ``lm_eval_include`` folder (lm-eval's ``TaskManager(include_path=...)``).
A name lm-eval does not know is an :class:`UnknownLmEvalTaskError` when the study
file is read, before any edit. lm-eval reads a ``dataset_path`` from the hub as it
always does; a local file needs ``dataset_path: json`` and ``data_files`` (relative
paths are relative to the working directory, as in lm-eval).

At each checkpoint, :func:`evaluate_task` runs the task through
``lm_eval.evaluate`` with :class:`~editkit.lm_eval_bridge.EditkitLM` over the
checkpoint's engine (so routing editors act), with ``log_samples`` on, and turns
lm-eval's per-sample records into editkit's item rows:

* ``task`` ``lm_eval:<name>``; ``item_id`` lm-eval's ``doc_id`` (``<subtask>/<doc_id>``
  with ``subject`` the subtask, for a group); ``task_version`` the task's version and
  lm-eval's, so a run never pairs items of two versions;
* ``correct``: the task's first metric that lm-eval averages over documents (``acc``,
  ``exact_match``, ...; named in ``lm_eval_metric``), under its first filter; the
  others as ``correct_<metric>`` (``acc_norm`` as ``correct_norm``), and those of
  other filters as ``correct_<metric>_<filter>``. :func:`~editkit.benchmarks.aggregate`
  reports them as ``acc`` and ``acc_<...>`` with editkit's bootstrap intervals;
* multiple choice: ``choices`` (the continuations scored), ``logprobs``, ``target``
  (the gold index) and ``prediction`` (the argmax), so the paired changes of the gold
  log-likelihood, its probability share and accuracy work as for editkit's tasks;
  generation: ``output`` (the raw text) and ``prediction`` (after the first filter).

Metrics lm-eval aggregates otherwise (perplexities, corpus BLEU, F1) have no per-item
value; :attr:`LmEvalEvaluation.scores` holds lm-eval's value, with a 95% percentile
bootstrap interval from lm-eval's own aggregation of resampled items.

``limit`` is lm-eval's: the first ``limit`` documents of each (sub)task. lm-eval tasks
are not journaled: a run stopped inside one evaluates it again.
"""

from __future__ import annotations

import difflib
import functools
import logging
import math
import numbers
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .benchmarks.extract import is_degenerate
from .benchmarks.spec import UnknownTaskError

if TYPE_CHECKING:
    from .benchmarks.engine import Engine
    from .models import LoadedModel

__all__ = ["PREFIX", "LmEvalEvaluation", "UnknownLmEvalTaskError", "check_task", "evaluate_task",
           "is_lm_eval_task", "task_manager"]

log = logging.getLogger(__name__)

PREFIX = "lm_eval:"
FEWSHOT_SEED = 1234  # lm-eval's default few-shot sampler seed (simple_evaluate's fewshot_random_seed)
_INSTALL = "pip install 'editkit[lm_eval]'"


class UnknownLmEvalTaskError(UnknownTaskError):
    """lm-eval knows no task, group or tag of that name (with the include folder given)."""


@dataclass(frozen=True)
class LmEvalEvaluation:
    """One lm-eval task evaluated on one model.

    Attributes:
        items: one row per document, in editkit's item columns (see the module docstring).
        scores: rows ``task, metric, value, ci_low, ci_high, n`` for the metrics that
            lm-eval does not average over documents; the averaged ones come from
            :func:`~editkit.benchmarks.aggregate` of ``items``.
        raw: lm-eval's result dictionary (``results``, ``samples``, ``versions``, ...).
    """

    items: pd.DataFrame
    scores: pd.DataFrame
    raw: dict[str, Any]


def is_lm_eval_task(task: str) -> bool:
    """Whether a study task name is an lm-eval task (``lm_eval:<name>``)."""
    return task.startswith(PREFIX)


def _lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError as error:
        raise ImportError(f"tasks named {PREFIX}<task> need lm-evaluation-harness: {_INSTALL}") from error
    return lm_eval


@functools.lru_cache(maxsize=4)
def _manager(include: str | None) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include)  # indexes every task YAML once (seconds)


def task_manager(include: str | os.PathLike[str] | None = None) -> Any:
    """lm-eval's ``TaskManager`` with ``include`` (a folder of task YAMLs); one per folder and process.

    Raises:
        ImportError: lm-eval is not installed.
        FileNotFoundError: ``include`` is not a folder.
    """
    _lm_eval()
    if include is None:
        return _manager(None)
    folder = Path(include).resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"lm_eval_include {str(include)!r} is not a folder of lm-eval task YAMLs")
    return _manager(str(folder))


def check_task(task: str, include: str | os.PathLike[str] | None = None) -> str:
    """The lm-eval name of ``lm_eval:<name>``, after checking that lm-eval knows it.

    Raises:
        UnknownLmEvalTaskError: no such task, group or tag (the message names close matches).
        ImportError: lm-eval is not installed.
    """
    if not is_lm_eval_task(task):
        raise ValueError(f"{task!r} is not an lm-eval task name ({PREFIX}<task>)")
    name = task[len(PREFIX):]
    known = task_manager(include).all_tasks
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(PREFIX + c for c in close)}?" if close else ""
        where = f"lm-eval's tasks and {include}" if include is not None else "lm-eval's tasks (no lm_eval_include)"
        raise UnknownLmEvalTaskError(f"unknown lm-eval task {name!r} in {where}{hint}")
    return name


def evaluate_task(lm: LoadedModel | Engine, task: str, limit: int | None = None, *,
                  include: str | os.PathLike[str] | None = None, n_boot: int = 1000, seed: int = 0,
                  batch_size: int | str = 8) -> LmEvalEvaluation:
    """Run one lm-eval task (``lm_eval:<name>``) on a model; the model is unchanged on return.

    Args:
        lm: a loaded model, or the engine over one (a checkpoint's).
        task: ``lm_eval:<name>``.
        limit: the first ``limit`` documents of each lm-eval (sub)task; None for all.
        include: a folder of task YAMLs besides lm-eval's own.
        n_boot: bootstrap resamples of the intervals in :attr:`LmEvalEvaluation.scores`.
        seed: seeds those intervals.
        batch_size: the engine's batch size when ``lm`` is a model.

    Raises:
        UnknownLmEvalTaskError: lm-eval knows no such task.
        ImportError: lm-eval is not installed.
    """
    lm_eval = _lm_eval()
    from lm_eval.api.metrics import mean

    from .lm_eval_bridge import EditkitLM

    name = check_task(task, include)
    loaded = task_manager(include).load([name])
    leaves = loaded["tasks"]
    for leaf in leaves.values():  # what simple_evaluate does before lm_eval.evaluate
        if leaf.get_config("num_fewshot") is None:
            leaf.set_config(key="num_fewshot", value=0)
        leaf.set_fewshot_seed(seed=FEWSHOT_SEED)
    raw = lm_eval.evaluate(lm=EditkitLM(lm, batch_size=batch_size), task_dict=loaded, limit=limit,
                           bootstrap_iters=0, log_samples=True)
    rows, scores = [], []
    for leaf_name, leaf in leaves.items():
        subject = leaf_name if len(leaves) > 1 or leaf_name != name else None
        averaged = [metric for metric, function in leaf.aggregation().items() if function is mean]
        version = f"{raw['versions'].get(leaf_name)} (lm-eval {lm_eval.__version__})"
        samples = raw["samples"][leaf_name]
        rows += _rows(task, leaf.OUTPUT_TYPE, samples, averaged, version, subject, raw["n-shot"].get(leaf_name, 0))
        own = [(metric, function) for metric, function in leaf.aggregation().items() if function is not mean]
        label = task if subject is None else f"{task}/{subject}"
        scores += _aggregated_rows(label, samples, own, raw["results"][leaf_name], n_boot, seed)
    items = pd.DataFrame(rows)
    return LmEvalEvaluation(items=items, scores=pd.DataFrame(scores, columns=list(_SCORE_COLUMNS)), raw=raw)


_SCORE_COLUMNS = ("task", "metric", "value", "ci_low", "ci_high", "n")


def _filters(samples: Sequence[dict[str, Any]]) -> list[str]:
    """Filter names in the order lm-eval logged them (the first is the task's primary filter)."""
    return list(dict.fromkeys(sample["filter"] for sample in samples))


def _column(metric: str, filter_name: str, primary_filter: str) -> str:
    name = metric[len("acc_"):] if metric.startswith("acc_") else metric
    return f"correct_{name}" + ("" if filter_name == primary_filter else f"_{filter_name}")


def _number(value: Any) -> float | None:
    if isinstance(value, (bool, np.bool_, numbers.Real)):
        return float(value)
    return None


def _rows(task: str, output_type: str, samples: Sequence[dict[str, Any]], averaged: Sequence[str], version: str,
          subject: str | None, num_fewshot: int) -> list[dict[str, Any]]:
    filters = _filters(samples)
    by_doc: dict[int, dict[str, dict[str, Any]]] = {}
    for sample in samples:
        by_doc.setdefault(sample["doc_id"], {})[sample["filter"]] = sample
    primary_metric = averaged[0] if averaged else None
    rows = []
    for doc_id, per_filter in by_doc.items():
        sample = per_filter[filters[0]]
        arguments = [tuple(a) if isinstance(a, (list, tuple)) else (a,) for a in sample["arguments"]]
        row: dict[str, Any] = {
            "task": task, "task_version": version,
            "item_id": str(doc_id) if subject is None else f"{subject}/{doc_id}", "subject": subject,
            "prompt": arguments[0][0] if arguments else None, "choices": None, "target": sample.get("target"),
            "prediction": None, "correct": None, "output": None, "format_failure": False, "unusable": False,
            "finite": None, "num_fewshot": num_fewshot,
            "lm_eval_metric": None if primary_metric is None else f"{primary_metric},{filters[0]}",
        }
        row.update(_responses(output_type, arguments, sample))
        for metric in averaged:
            for filter_name, filtered in per_filter.items():
                value = _number(filtered.get(metric))
                if metric == primary_metric and filter_name == filters[0]:
                    row["correct"] = value
                elif value is not None:
                    row[_column(metric, filter_name, filters[0])] = value
        rows.append(row)
    return rows


def _responses(output_type: str, arguments: Sequence[tuple], sample: dict[str, Any]) -> dict[str, Any]:
    """The columns read from a sample's responses: choices and log-likelihoods, or the generated text."""
    filtered = sample.get("filtered_resps") or []
    if output_type == "multiple_choice":
        choices = [argument[1] for argument in arguments]
        logprobs = [float(response[0]) for response in filtered][: len(choices)]
        finite = all(math.isfinite(lp) for lp in logprobs)
        prediction = max(range(len(logprobs)), key=lambda i: (logprobs[i], -i)) if finite and logprobs else -1
        return {"choices": choices, "logprobs": logprobs, "finite": finite, "prediction": prediction}
    if output_type == "generate_until":
        raw = sample.get("resps") or [[None]]
        output = raw[0][0] if raw and raw[0] else None
        prediction = filtered[0] if filtered else None
        degenerate = isinstance(output, str) and is_degenerate(output)
        return {"output": output, "prediction": prediction, "format_failure": degenerate, "unusable": degenerate}
    if output_type in ("loglikelihood", "loglikelihood_rolling") and filtered:
        first = filtered[0]
        value = float(first[0] if isinstance(first, (list, tuple)) else first)
        return {"finite": math.isfinite(value)}
    return {}


def _aggregated_rows(task: str, samples: Sequence[dict[str, Any]], metrics: Sequence[tuple[str, Callable]],
                     results: dict[str, Any], n_boot: int, seed: int) -> list[dict[str, Any]]:
    """lm-eval's own value of each metric it does not average, with a percentile bootstrap interval."""
    rows = []
    filters = _filters(samples)
    for metric, function in metrics:
        for filter_name in filters:
            values = [s[metric] for s in samples if s["filter"] == filter_name and metric in s]
            value = results.get(f"{metric},{filter_name}")
            if not values or value is None:
                continue
            low, high = _bootstrap(function, values, n_boot, seed, f"{task}\0{metric}\0{filter_name}")
            label = metric if filter_name == filters[0] else f"{metric}_{filter_name}"
            rows.append({"task": task, "metric": label, "value": float(value), "ci_low": low, "ci_high": high,
                         "n": len(values)})
    return rows


def _bootstrap(function: Callable, values: Sequence[Any], n_boot: int, seed: int, key: str) -> tuple[float, float]:
    """2.5% and 97.5% percentiles of ``function`` over item resamples (NaN where it cannot be computed)."""
    if n_boot < 1 or len(values) < 2:
        return math.nan, math.nan
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    draws = []
    for _ in range(n_boot):
        resample = [values[i] for i in rng.integers(0, len(values), size=len(values))]
        try:
            draws.append(float(function(resample)))
        except (ValueError, ZeroDivisionError, FloatingPointError, TypeError) as error:
            log.debug("no bootstrap interval for %s: %s", key.replace("\0", " "), error)
            return math.nan, math.nan
    low, high = np.nanpercentile(draws, [2.5, 97.5])
    return float(low), float(high)

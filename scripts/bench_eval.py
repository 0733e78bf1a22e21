"""Cross-check editkit's evaluation engine against lm-evaluation-harness on the same requests.

The SAME requests (``(context, continuation)`` pairs of likelihood tasks;
prompts, stop strings and token budgets of generation tasks, all built by
editkit's task specs) go through :class:`editkit.benchmarks.Engine` and through
lm-eval's ``HFLM`` wrapping the same in-memory model and tokenizer, in one
process. For each task it reports:

* ``answer_agreement``: share of items whose answer (argmax choice, or the
  extracted answer of a generation) is the same under both;
* ``max_abs_dlogprob``: the largest difference of a request's log-likelihood;
* ``identical_outputs``: share of generations that are the same text;
* items/s for each and their ratio (editkit / lm-eval);
* tokens/s: the tokens of each item (context plus its longest continuation,
  or plus the generated text) over editkit's time, and over the time of a bare
  ``model(input_ids)`` of the same sequences one at a time (no padding, no
  cache, every position's logits).

Example (CPU, one thread; the numbers in BENCHMARKS.md)::

    OMP_NUM_THREADS=1 python scripts/bench_eval.py --task mmlu=40 --task gsm8k=10 --threads 1

``--selection first`` takes the first items of the file (whole MMLU subjects,
as a full run sees them) instead of editkit's stratified ``limit`` (one
subject after another, round robin); ``--subjects N`` keeps the items of the
first N subjects of a stratified selection (``--task mmlu=200 --subjects 6``:
the 24 items of six subjects that a 200-item run holds, 3-4 per subject). Needs lm-eval:
``pip install 'editkit[lm_eval]'`` (0.4.13, which imports under transformers 5 as it is).
Results go to ``--out`` as JSON (summary) and CSV (one row per item).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from editkit import load_model
from editkit.benchmarks import Engine, GenerationRequest, build_requests, get_task
from editkit.benchmarks.evaluation import TaskRequests

log = logging.getLogger("bench_eval")


def lm_eval_hflm(lm: Any, batch_size: int) -> Any:
    """lm-eval's ``HFLM`` over an editkit :class:`~editkit.models.LoadedModel` (same weights, a tokenizer copy).

    The tokenizer is copied because HFLM may set a pad token on it. A
    tokenizer that adds BOS by default gets ``add_bos_token=True``, so both
    sides see the same ids (editkit encodes with the tokenizer's default
    special tokens, lm-eval without them unless told).
    """
    logging.getLogger("lm-eval").setLevel(logging.ERROR)
    from lm_eval.models.huggingface import HFLM

    tokenizer = copy.deepcopy(lm.tokenizer)
    adds_bos = bool(tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id])
    return HFLM(pretrained=lm.model, tokenizer=tokenizer, batch_size=batch_size, backend="causal",
                add_bos_token=adds_bos)


def _instances(requests: list[Any]) -> list[Any]:
    from lm_eval.api.instance import Instance

    if isinstance(requests[0], GenerationRequest):
        return [Instance("generate_until", {}, (r.context, {"until": list(r.until), "max_gen_toks": r.max_new_tokens,
                                                            "do_sample": False}), i)
                for i, r in enumerate(requests)]
    return [Instance("loglikelihood", {}, tuple(r), i) for i, r in enumerate(requests)]


def _same(first: Any, second: Any) -> bool:
    """Equal answers; two missing answers (nothing extracted) count as the same."""
    missing = [value is None or (isinstance(value, float) and math.isnan(value)) for value in (first, second)]
    return all(missing) or (not any(missing) and first == second)


def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


@dataclass
class Comparison:
    """The outcome of one task: a summary and one row per item."""

    summary: dict[str, Any]
    items: pd.DataFrame


def _sequences(engine: Engine, task: TaskRequests, outputs: list[str] | None) -> list[list[int]]:
    """The token sequence of each item that a bare forward runs (and that tokens/s counts)."""
    sequences = []
    for index, requests in enumerate(task.requests):
        if outputs is not None:
            sequences.append(engine.encode(task.prompts[index] + outputs[index]))
            continue
        pairs = [engine.encode_pair(context, continuation) for context, continuation in requests]
        context, _ = pairs[0]
        sequences.append(context + max((cont for _, cont in pairs), key=len))
    return sequences


def bare_forward_seconds(engine: Engine, sequences: list[list[int]]) -> float:
    """Seconds for one plain forward pass per sequence (batch of one, all logits)."""
    model, device = engine.model, engine.device
    start = time.perf_counter()
    with torch.inference_mode():
        for ids in sequences:
            model(torch.tensor([ids[-engine.max_length :]], device=device))
    return time.perf_counter() - start


def compare(engine: Engine, hflm: Any, task: TaskRequests, bare: bool = True) -> Comparison:
    """Run one task's requests through both engines and compare them.

    Args:
        engine: editkit's engine.
        hflm: lm-eval's ``HFLM`` over the same model.
        task: the items and requests (from :func:`editkit.benchmarks.build_requests`).
        bare: also time a bare forward pass over the same tokens.
    """
    flat = task.flat
    kind = task.spec.kind
    ours, our_seconds = _timed(getattr(engine, kind), flat)
    theirs, their_seconds = _timed(getattr(hflm, kind), _instances(flat))
    our_rows, their_rows = pd.DataFrame(task.rows(ours)), pd.DataFrame(task.rows(theirs))
    n = len(task.docs)
    items = pd.DataFrame({"task": task.spec.name, "item_id": our_rows["item_id"],
                          "editkit": our_rows["prediction"], "lm_eval": their_rows["prediction"],
                          "target": our_rows["target"]})
    items["same_answer"] = [_same(a, b) for a, b in zip(items["editkit"], items["lm_eval"])]
    summary: dict[str, Any] = {"task": task.spec.name, "kind": kind, "items": n, "requests": len(flat),
                               "num_fewshot": task.num_fewshot,
                               "answer_agreement": float(items["same_answer"].mean()),
                               "acc_editkit": float(our_rows["correct"].mean()),
                               "acc_lm_eval": float(their_rows["correct"].mean())}
    if kind == "loglikelihood":
        deltas = [abs(a[0] - b[0]) for a, b in zip(ours, theirs)]
        per_item = [max(deltas[i] for i in range(start, start + len(r)))
                    for start, r in zip(_offsets(task.requests), task.requests)]
        items["max_abs_dlogprob"] = per_item
        summary["max_abs_dlogprob"] = math.nan if any(d != d for d in deltas) else max(deltas)  # NaN-aware
        summary["greedy_flag_agreement"] = sum(a[1] == b[1] for a, b in zip(ours, theirs)) / len(flat)
        if "prediction_norm" in our_rows:
            summary["acc_norm_answer_agreement"] = float(pd.Series(
                [_same(a, b) for a, b in zip(our_rows["prediction_norm"], their_rows["prediction_norm"])]).mean())
        outputs = None
    else:
        items["same_output"] = [a == b for a, b in zip(ours, theirs)]
        items["output_editkit"], items["output_lm_eval"] = ours, theirs
        summary["identical_outputs"] = float(items["same_output"].mean())
        outputs = list(ours)
    summary.update(seconds_editkit=our_seconds, seconds_lm_eval=their_seconds,
                   items_per_s_editkit=n / our_seconds, items_per_s_lm_eval=n / their_seconds,
                   speedup=their_seconds / our_seconds)
    if bare:
        sequences = _sequences(engine, task, outputs)
        tokens = sum(len(s) for s in sequences)
        bare_seconds = bare_forward_seconds(engine, sequences)
        summary.update(tokens=tokens, tokens_per_s_editkit=tokens / our_seconds,
                       tokens_per_s_bare_forward=tokens / bare_seconds,
                       tokens_per_s_lm_eval=tokens / their_seconds)
    return Comparison(summary, items)


def _offsets(requests: list[list[Any]]) -> list[int]:
    offsets, total = [], 0
    for item in requests:
        offsets.append(total)
        total += len(item)
    return offsets


def task_requests(name: str, limit: int, selection: str = "stratified", max_new_tokens: int | None = None,
                  num_fewshot: int | None = None, subjects: int | None = None) -> TaskRequests:
    """The requests of ``limit`` items of a task, chosen ``"stratified"`` (editkit's limit) or ``"first"``.

    ``subjects`` keeps, of a stratified selection, only the items of its first
    ``subjects`` subjects: a slice of a large stratified run that keeps its
    items-per-subject structure (what prefix sharing depends on).
    """
    spec = get_task(name)
    if max_new_tokens is not None and spec.kind == "generate_until":
        spec = spec.with_options(max_new_tokens=max_new_tokens)
    if selection == "stratified":
        task = build_requests(spec, limit, num_fewshot)
        if subjects is None:
            return task
        kept = sorted({doc.subject for doc in task.docs}, key=str)[:subjects]
        rows = [k for k, doc in enumerate(task.docs) if doc.subject in kept]
        return TaskRequests(spec, [task.docs[k] for k in rows], [task.prompts[k] for k in rows],
                            [task.requests[k] for k in rows], task.num_fewshot)
    docs = spec.load(spec.eval_split)[:limit]
    shots = spec.num_fewshot if num_fewshot is None else num_fewshot
    pool = spec.load(spec.fewshot_split) if shots else []
    prompts = [spec.prompt(doc, spec.select_shots(doc, pool, shots) if shots else ()) for doc in docs]
    return TaskRequests(spec, docs, prompts, [spec.requests(d, p) for d, p in zip(docs, prompts)], shots)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", default="cpu", help="cpu, auto (the accelerator if any) or a torch device")
    parser.add_argument("--dtype", default="float32", help="model dtype")
    parser.add_argument("--task", action="append", default=[], metavar="TASK=N",
                        help="task and item count; repeat (default mmlu=200, commonsense_qa=100, gsm8k=50)")
    parser.add_argument("--selection", choices=("stratified", "first"), default="stratified")
    parser.add_argument("--subjects", type=int, default=None,
                        help="keep only the first N subjects of a stratified selection")
    parser.add_argument("--batch-size", type=int, default=8, help="the same for both engines")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="override generation budgets")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-bare", action="store_true", help="skip the bare-forward timing")
    parser.add_argument("--out", type=Path, default=Path("results/bench_eval"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    pairs = [item.partition("=") for item in args.task] or [("mmlu", "", "200"), ("commonsense_qa", "", "100"),
                                                            ("gsm8k", "", "50")]
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    engine = Engine(lm, batch_size=args.batch_size, progress=False)
    hflm = lm_eval_hflm(lm, args.batch_size)
    summaries, frames = [], []
    for name, _, count in pairs:
        task = task_requests(name, int(count), args.selection, args.max_new_tokens, subjects=args.subjects)
        result = compare(engine, hflm, task, bare=not args.no_bare)
        result.summary.update(model=args.model, device=str(lm.device), threads=torch.get_num_threads(),
                              batch_size=args.batch_size, selection=args.selection, subjects=args.subjects,
                              load_average=round(os.getloadavg()[0], 2))
        log.info("%s", json.dumps(result.summary, indent=1))
        summaries.append(result.summary)
        frames.append(result.items)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summaries, indent=2))
    pd.concat(frames, ignore_index=True).to_csv(args.out / "items.csv", index=False)
    log.info("wrote %s", args.out)
    return summaries


if __name__ == "__main__":
    main()

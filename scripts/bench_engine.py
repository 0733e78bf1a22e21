"""Benchmark the evaluation engine: items per second per task, and the scores obtained.

Speed targets live here, not in the tests. Example (about 10 minutes on 2 CPU cores)::

    python scripts/bench_engine.py --limit mmlu=57 --limit mmlu_cloze=57 --limit gsm8k=10

``--compare-sharing`` also times each task without shared few-shot prefixes
(:attr:`editkit.benchmarks.Engine.share_prefix`) and, for likelihood tasks,
without any sharing (``share_context`` off too), to show what sharing saves.
``--compare-journal`` also times each task with an item journal (``evaluate(...,
journal=...)`` into a fresh temporary folder), to show what per-item resume costs.
Results go to ``--out`` as JSON (rates) and CSV (items, metrics).

Timing on a shared 2-core machine: when other processes keep a core busy, two
OpenMP threads wait on each other at every operation and a forward pass can be
ten times slower; ``--threads 1`` is then faster. The load average is logged.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from editkit import load_model
from editkit.benchmarks import Engine, aggregate, evaluate, get_task

log = logging.getLogger("bench_engine")


def _parse_limits(pairs: list[str]) -> dict[str, int | None]:
    limits: dict[str, int | None] = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        limits[name] = int(value) if value else None
    return limits


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", default=None, help="torch device (default CPU; 'auto' for an accelerator)")
    parser.add_argument("--limit", action="append", default=[], metavar="TASK=N",
                        help="task and item count; repeat for several tasks")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="override generation budgets")
    parser.add_argument("--compare-sharing", action="store_true")
    parser.add_argument("--compare-journal", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path("results/bench_engine"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    limits = _parse_limits(args.limit) or {"mmlu": 57, "mmlu_cloze": 57, "gsm8k": 10}

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    lm = load_model(args.model, device=args.device)
    log.info("loaded %s in %.1f s on %s, %d torch threads, load average %.2f", args.model,
             time.perf_counter() - start, lm.device, torch.get_num_threads(), os.getloadavg()[0])
    frames, rates = [], {}
    for name, limit in limits.items():
        spec = get_task(name)
        if args.max_new_tokens is not None and spec.kind == "generate_until":
            spec = spec.with_options(max_new_tokens=args.max_new_tokens)
        modes = {name: (True, True, False)}
        if args.compare_sharing:
            modes[f"{name} (no prefix sharing)"] = (True, False, False)
            if spec.kind == "loglikelihood":
                modes[f"{name} (no sharing)"] = (False, False, False)
        if args.compare_journal:
            modes[f"{name} (journaled)"] = (True, True, True)
        for key, (share_context, share_prefix, journaled) in modes.items():
            engine = Engine(lm, batch_size=args.batch_size, progress=False)
            engine.share_context, engine.share_prefix = share_context, share_prefix
            with tempfile.TemporaryDirectory() as folder:
                start = time.perf_counter()
                items = evaluate(engine, spec, limit=limit, progress=False, journal=folder if journaled else None)
                elapsed = time.perf_counter() - start
            rates[key] = {"items": len(items), "seconds": round(elapsed, 2),
                          "items_per_second": round(len(items) / elapsed, 3),
                          "load_average": round(os.getloadavg()[0], 2)}
            log.info("%-34s %5d items %8.1f s %8.3f items/s (load %.2f)", key, len(items), elapsed,
                     len(items) / elapsed, os.getloadavg()[0])
            if key == name:
                frames.append(items)
    import pandas as pd

    items = pd.concat(frames, ignore_index=True)
    metrics = aggregate(items)
    overall = metrics[~metrics["task"].str.contains("/")]
    log.info("\n%s", overall.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rates.json").write_text(json.dumps({"model": args.model, "device": str(lm.device),
                                                     "batch_size": args.batch_size, "rates": rates}, indent=2))
    items.to_csv(args.out / "items.csv", index=False)
    metrics.to_csv(args.out / "metrics.csv", index=False)
    log.info("wrote %s", args.out)
    return rates


if __name__ == "__main__":
    main()

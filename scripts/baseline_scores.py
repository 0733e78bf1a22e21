"""Unedited scores of one model on every benchmark task, with 95% CIs and format-failure rates.

Every registered task is evaluated on the same fixed subset editkit's ``limit`` selects
(stratified by subject or BBH subtask, deterministic), by default 200 items, or the
whole task where it is smaller. Each task is saved as soon as it finishes
(``<out>/items/<task>.parquet``, with its wall time in ``<out>/timings.json``), and a
rerun skips finished tasks. Within a task, finished items are journaled every 16
items under ``<out>/partial/``, so an interrupted task resumes at the item it
reached (the wall time then counts only the resumed part). The summary goes to
``<out>/summary.csv`` (every metric of :func:`editkit.benchmarks.aggregate`) and
``<out>/table.md`` (the headline metrics), and the table is written to stdout::

    OMP_NUM_THREADS=2 python scripts/baseline_scores.py --limit 200 --out results/baseline/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from editkit import load_model
from editkit.benchmarks import aggregate, evaluate, list_tasks
from editkit.benchmarks.journal import journal_path
from editkit.store import write_items

log = logging.getLogger("baseline_scores")

# Headline metrics per task, in table order: accuracy first, then the variants a task defines.
HEADLINE = ("acc", "acc_macro", "acc_norm", "acc_flexible")


def run_tasks(lm, tasks: list[str], limit: int | None, out: Path, batch_size: int | str,
              key: str) -> dict[str, float]:
    """Evaluate each task not yet saved under ``out``; returns wall seconds per task (old and new)."""
    (out / "items").mkdir(parents=True, exist_ok=True)
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    for task in tasks:
        path = out / "items" / f"{task}.parquet"
        if path.exists():
            log.info("%s: already done, kept (%s)", task, path)
            continue
        start = time.perf_counter()
        items = evaluate(lm, [task], limit=limit, batch_size=batch_size, journal=out / "partial", journal_key=key)
        timings[task] = round(time.perf_counter() - start, 1)
        tmp = path.with_suffix(".tmp")
        write_items(items, tmp)
        tmp.replace(path)
        journal_path(out / "partial", task).unlink(missing_ok=True)
        timings_path.write_text(json.dumps(timings, indent=1, sort_keys=True))
        log.info("%s: %d items in %.0f s", task, len(items), timings[task])
    return timings


def headline_table(summary: pd.DataFrame, timings: dict[str, float]) -> str:
    """One row per task: headline metrics with CIs, format-failure rate, constant-answer share, time."""
    lines = ["| task | items | metric: value [95% CI] | format failures | constant-answer share | seconds |",
             "|---|---|---|---|---|---|"]
    for task in sorted(t for t in summary["task"].unique() if "/" not in t):
        rows = summary[summary["task"] == task].set_index("metric")
        cells = [f"{m} {rows.at[m, 'value']:.3f} [{rows.at[m, 'ci_low']:.3f}, {rows.at[m, 'ci_high']:.3f}]"
                 for m in HEADLINE if m in rows.index]
        fail = f"{rows.at['format_failure_rate', 'value']:.3f}" if "format_failure_rate" in rows.index else "–"
        const = f"{rows.at['constant_answer_share', 'value']:.2f}" if "constant_answer_share" in rows.index else "–"
        lines.append(f"| `{task}` | {int(rows['n'].iloc[0])} | {'; '.join(cells)} | {fail} | {const} "
                     f"| {timings.get(task, float('nan')):.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--task", action="append", help="a task name; repeat (default: every registered task)")
    parser.add_argument("--limit", type=int, default=200, help="items per task (0: every item)")
    parser.add_argument("--batch-size", default="8", help='an integer or "auto"')
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None, help="default results/baseline/<model>")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or Path("results/baseline") / args.model.replace("/", "--")
    batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    tasks = args.task or list_tasks()
    timings = run_tasks(lm, tasks, args.limit or None, out, batch_size, key=f"{args.model} {args.dtype}")
    items = pd.concat([pd.read_parquet(out / "items" / f"{t}.parquet") for t in tasks], ignore_index=True)
    summary = aggregate(items)
    summary.to_csv(out / "summary.csv", index=False)
    table = headline_table(summary, timings)
    (out / "table.md").write_text(table + "\n")
    sys.stdout.write(table + "\n")


if __name__ == "__main__":
    main()

"""Per-edit seconds of the locate-then-edit editors, with and without the cached prefix.

Target optimisation (ROME's v*, MEMIT's and AlphaEdit's z) runs the positions
before the subject's last token once per edit and skips the blocks below the
hooked one (:class:`editkit.prefix_cache.PrefixCachedBatch`). This script times
each editor's ``edit`` of one CounterFact request both ways, in one process and
interleaved (ABBA order per request, so drift in the machine's load hits both),
and reports the relative difference between the two weight updates as the editor
computed them (before they are rounded into the float32 weights).

*Before* is the full batch at every step, forced by refusing the split. It
already reads v0 in the first step; the code before this change ran one more
no-grad forward pass for it, so the speed-up reported here is slightly
conservative.

Example (about 15 minutes on 2 CPU cores, one thread)::

    OMP_NUM_THREADS=1 python scripts/bench_edit.py --methods rome memit alphaedit --n 4

Editors use their packaged settings for the model (``editkit/configs/*.yaml``);
MEMIT's and AlphaEdit's second-moment statistics are computed (or read from the
cache) before timing starts. Results go to ``--out`` as JSON and CSV.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import torch

import editkit
import editkit.locate
from editkit import load_model
from editkit.datasets import load_edit_requests
from editkit.editing import Editor
from editkit.prefix_cache import SplitUnsupported
from editkit.types import EditRequest

log = logging.getLogger("bench_edit")


def _refuse(*args: object, **kwargs: object) -> None:
    raise SplitUnsupported("refused by bench_edit (the 'before' path)")


@contextlib.contextmanager
def full_batch() -> Iterator[None]:
    """Run target optimisation on the full batch at every step (the path before the split)."""
    real = editkit.locate.PrefixCachedBatch
    editkit.locate.PrefixCachedBatch = _refuse
    try:
        yield
    finally:
        editkit.locate.PrefixCachedBatch = real


@contextlib.contextmanager
def recorded_updates(editor: Editor) -> Iterator[dict[str, torch.Tensor]]:
    """The updates ``editor`` adds to each parameter, as computed (before float32 rounding).

    Comparing weights after an edit would measure the rounding of ``W + ΔW`` to the
    parameter's dtype as well: about 1e-4 of a small update on SmolLM2, which hides the
    difference between two computations of ΔW.
    """
    updates: dict[str, torch.Tensor] = {}
    real = editor._update_weight

    def spy(handle: object, path: str, delta: torch.Tensor) -> None:
        updates[path] = updates.get(path, 0) + delta.detach().double()
        real(handle, path, delta)

    editor._update_weight = spy
    try:
        yield updates
    finally:
        del editor._update_weight


def timed_edit(editor: Editor, request: EditRequest) -> tuple[float, dict[str, torch.Tensor]]:
    """Seconds for one edit and the updates it computed (the edit is then undone)."""
    with recorded_updates(editor) as updates:
        start = time.perf_counter()
        handle = editor.edit(request)
        seconds = time.perf_counter() - start
    handle.restore()
    return seconds, updates


def noise_floor(editor: Editor, request: EditRequest, reference: dict[str, torch.Tensor], scale: float) -> float:
    """How far the full-batch update moves when one weight is perturbed at float32's rounding scale.

    The last block's MLP output weight is multiplied by ``1 ± scale`` (random signs, fixed
    seed) and the edit rerun on the full batch: the relative change of the update is how
    reproducible the optimisation is at all in float32. An update that moves by 1e-4 here
    cannot be expected to match another arrangement of the same sums to 1e-5.
    """
    lm = editor.lm
    weight = lm.adapter.weight(lm.model, "mlp_out", lm.adapter.n_layers(lm.model) - 1)
    original = weight.detach().clone()
    noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)).sign()
    with torch.no_grad():
        weight.mul_(1 + scale * noise.to(weight.dtype))
    try:
        with full_batch():
            _, perturbed = timed_edit(editor, request)
    finally:
        with torch.no_grad():
            weight.copy_(original)
    return relative_difference(perturbed, reference)


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if set(a) != set(b):
        return float("inf")
    num = sum(float((a[n] - b[n]).norm() ** 2) for n in a)
    den = sum(float(b[n].norm() ** 2) for n in b)
    return (num / den) ** 0.5 if den else float("nan")


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", default="cpu", help="cpu, auto (the accelerator if any) or a torch device")
    parser.add_argument("--methods", nargs="+", default=["rome", "memit", "alphaedit"])
    parser.add_argument("--n", type=int, default=4, help="CounterFact requests timed per method")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--dtype", default="float32", help="model dtype")
    parser.add_argument("--noise-floor", type=float, default=None, metavar="SCALE",
                        help="also rerun the full batch with the last MLP weight scaled by 1 ± SCALE (e.g. 1e-7) "
                             "and report how far that moves the update (untimed)")
    parser.add_argument("--out", type=Path, default=Path("results/bench_edit"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    requests = load_edit_requests("counterfact", "edit", args.n + 1)
    log.info("load average before: %s", os.getloadavg())
    rows = []
    for method in args.methods:
        editor = editkit.get_editor(method, lm)
        editor.edit(requests[0]).restore()  # warm-up: context templates, statistics, allocator
        for index, request in enumerate(requests[1:]):
            order = ("after", "before") if index % 2 else ("before", "after")
            results = {}
            for path in order + order[::-1]:
                context = full_batch() if path == "before" else contextlib.nullcontext()
                with context:
                    results.setdefault(path, []).append(timed_edit(editor, request))
            before = statistics.mean(s for s, _ in results["before"])
            after = statistics.mean(s for s, _ in results["after"])
            difference = relative_difference(results["after"][0][1], results["before"][0][1])
            floor = math.nan
            if args.noise_floor:
                floor = noise_floor(editor, request, results["before"][0][1], args.noise_floor)
            rows.append({"method": method, "case_id": request.case_id, "before_s": before, "after_s": after,
                         "speedup": before / after, "update_rel_diff": difference, "noise_floor_rel_diff": floor})
            log.info("%s %s: before %.2f s, after %.2f s (x%.2f), update differs by %.1e (noise floor %.1e)",
                     method, request.case_id, before, after, before / after, difference, floor)
    log.info("load average after: %s", os.getloadavg())
    table = pd.DataFrame(rows)
    summary = table.groupby("method", sort=False).agg(
        before_s=("before_s", "mean"), after_s=("after_s", "mean"), max_update_rel_diff=("update_rel_diff", "max"),
        max_noise_floor=("noise_floor_rel_diff", "max"))
    summary["speedup"] = summary["before_s"] / summary["after_s"]
    log.info("\n%s", summary.to_string(float_format=lambda x: f"{x:.3g}"))
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "edits.csv", index=False)
    (args.out / "summary.json").write_text(json.dumps(
        {"model": args.model, "dtype": args.dtype, "device": str(lm.device), "threads": args.threads,
         "torch": torch.__version__, "summary": summary.reset_index().to_dict(orient="records")}, indent=2))
    return table


if __name__ == "__main__":
    main()

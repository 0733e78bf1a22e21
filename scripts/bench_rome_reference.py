"""Seconds per ROME edit, editkit against the reference implementation (kmeng01/rome), side by side.

Both run in one process on the same model object, request, layer, hyperparameters and
context templates: editkit's sampled prefixes are fed to the reference through its
``CONTEXT_TEMPLATES_CACHE``. A preflight (untimed) checks that both sides build the same
prompt strings, target ids, token ids of every optimisation row and subject lookup
indices, and stops if they differ. After one warm-up edit per side, the requests are timed
``--reps`` times, interleaved (even reps run editkit first, odd reps the reference first);
each time reported is the median over reps, and the relative difference of the two ΔW
(weight after the edit minus before, compared in float64). Both sides must restore the
weight bit-exactly.

``--reference`` is a checkout of kmeng01/rome (checked at 0874014) patched for CPU; the
patch is kept outside this repository and changes:

* ``"cuda"`` -> the model's device in ``rome/compute_v.py``, ``rome/compute_u.py``,
  ``rome/layer_stats.py`` and ``util/perplexity.py``;
* the width of ``delta`` in ``compute_v`` falls back to ``config.hidden_size`` (Llama has
  no ``n_embd``);
* the unused ``matplotlib`` import in ``compute_v`` is dropped;
* ``util/globals.py`` reads ``globals.yml`` from the repository root, not the cwd.

Example (about 15 minutes on 2 CPU cores, one thread; the defaults time CounterFact cases 0, 1 and 4)::

    OMP_NUM_THREADS=1 python scripts/bench_rome_reference.py --reference /path/to/rome

Results go to ``--out``: ``result.txt`` (the log), ``edits.csv``, ``summary.json`` and
``ref_stdout.log`` (what the reference prints during its calls).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch

import editkit
from editkit import load_model
from editkit.datasets import load_edit_requests
from editkit.tokens import encode, encode_pair, subject_last_token, target_text
from editkit.types import EditRequest

log = logging.getLogger("bench_rome_reference")


def reference_hparams(hparams_class: type, params: Any, adapter: Any) -> Any:
    """The reference's ``ROMEHyperParams`` equal to editkit's ``ROMEParams``, module paths from the adapter."""
    return hparams_class(
        layers=list(params.layers), fact_token=params.fact_token, v_num_grad_steps=params.v_num_grad_steps,
        v_lr=params.v_lr, v_loss_layer=params.v_loss_layer, v_weight_decay=params.v_weight_decay,
        clamp_norm_factor=params.clamp_norm_factor, kl_factor=params.kl_factor,
        mom2_adjustment=params.mom2_adjustment,
        context_template_length_params=[list(x) for x in params.context_template_length_params],
        rewrite_module_tmp=adapter.mlp_out, layer_module_tmp=adapter.blocks + ".{}", mlp_module_tmp=adapter.mlp,
        attn_module_tmp=adapter.attn_out.rsplit(".", 1)[0], ln_f_module=adapter.final_norm,
        lm_head_module=adapter.unembed,
        # Unused while mom2_adjustment is False (C = I on both sides).
        mom2_dataset="wikipedia", mom2_n_samples=params.mom2_n_samples, mom2_dtype="float32",
    )


def reference_request(request: EditRequest) -> dict:
    # The reference wants "{}" for the subject and prepends the space to the target itself.
    return {"prompt": request.prompt_template, "subject": request.subject, "target_new": {"str": request.target_new}}


def preflight(tokenizer: Any, repr_tools: Any, prefixes: list[str], request: EditRequest) -> None:
    """Check both sides see the same strings, target ids, row token ids and lookup indices."""
    templates = [prefix + "{}" for prefix in prefixes]
    prompt = reference_request(request)["prompt"]
    ref_target = tokenizer(target_text(request.target_new))["input_ids"]
    # Reference rows: template.format(prompt) + decode(target[:-1]), then .format(subject); KL row "{} is a".
    ref_rows = [t.format(prompt) + tokenizer.decode(ref_target[:-1]) for t in templates] + ["{} is a"]
    ref_ids = [tokenizer(row.format(request.subject))["input_ids"] for row in ref_rows]

    def lookup(row: str) -> int:
        return repr_tools.get_words_idxs_in_templates(tokenizer, [row], [request.subject], "last")[0][0]

    ref_look = [lookup(row) for row in ref_rows]
    ref_u_look = [lookup(t.format(prompt)) for t in templates]  # compute_u: the templates without the target
    ek_ids, ek_look, ek_targets = [], [], set()
    for prefix in prefixes:
        context, position = subject_last_token(tokenizer, prefix, request.prompt, request.subject)
        context_ids, target_ids = encode_pair(tokenizer, context, target_text(request.target_new))
        ek_ids.append(context_ids + target_ids[:-1])
        ek_look.append(position)
        ek_targets.add(tuple(target_ids))
    text, position = subject_last_token(tokenizer, "", f"{request.subject} is a", request.subject)
    ek_ids.append(encode(tokenizer, text))
    ek_look.append(position)
    checks = {
        "prompt strings": all(p + request.prompt == t.format(prompt).format(request.subject)
                              for p, t in zip(prefixes, templates)),
        "target ids": ek_targets == {tuple(ref_target)},
        "row token ids": ref_ids == ek_ids,
        "lookup idx (v rows + KL)": ref_look == ek_look,
        "lookup idx (u rows)": ref_u_look == ek_look[:-1],
    }
    log.info("[%s] target ids %s; identical: %s", request.case_id, ref_target,
             ", ".join(f"{name} {ok}" for name, ok in checks.items()))
    if not all(checks.values()):
        for i, (a, b, la, lb) in enumerate(zip(ref_ids, ek_ids, ref_look, ek_look)):
            if a != b or la != lb:
                log.error("    row %d: reference %s @%d | editkit %s @%d", i, a, la, b, lb)
        failed = [name for name, ok in checks.items() if not ok]
        raise RuntimeError(f"request {request.case_id}: editkit and the reference differ in {', '.join(failed)}")


def run_editkit(editor: Any, weight: torch.Tensor, original: torch.Tensor,
                request: EditRequest) -> tuple[float, torch.Tensor]:
    """Seconds for editkit's edit and its ΔW; the edit is then undone."""
    start = time.perf_counter()
    handle = editor.edit(request)
    seconds = time.perf_counter() - start
    delta = weight.detach().double() - original.double()
    handle.restore()
    assert torch.equal(weight, original), "editkit restore not bit-exact"
    return seconds, delta


def run_reference(apply_rome: Any, model: Any, tokenizer: Any, hparams: Any, weight_path: str,
                  original: torch.Tensor, request: EditRequest, stdout_log: TextIO) -> tuple[float, torch.Tensor]:
    """Seconds for the reference's edit and its ΔW; its prints go to ``stdout_log``; the edit is undone."""
    weight = model.get_parameter(weight_path)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        start = time.perf_counter()
        _, saved = apply_rome(model, tokenizer, [reference_request(request)], hparams, return_orig_weights=True)
        seconds = time.perf_counter() - start
    delta = weight.detach().double() - original.double()
    with torch.no_grad():
        weight[...] = saved[weight_path]
    assert torch.equal(weight, original), "reference restore not bit-exact"
    stdout_log.write(f"===== {request.case_id}\n{buffer.getvalue()}\n")
    stdout_log.flush()
    return seconds, delta


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, required=True, help="CPU-patched checkout of kmeng01/rome")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--requests", type=int, nargs="+", default=[0, 1, 4],
                        help="CounterFact (edit split) case ids; the defaults are the first three packaged cases")
    parser.add_argument("--reps", type=int, default=2, help="timed repetitions per request and side")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path("results/bench_rome_reference"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(message)s",
                        handlers=[logging.StreamHandler(), logging.FileHandler(args.out / "result.txt", mode="w")])
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(args.reference.resolve()))  # the reference repo root holds rome/ and util/
    from rome import repr_tools, rome_main
    from rome.rome_main import ROMEHyperParams, apply_rome_to_model

    log.info("load average before: %s", os.getloadavg())
    log.info("torch %s, %d threads, OMP_NUM_THREADS=%s", torch.__version__, torch.get_num_threads(),
             os.environ.get("OMP_NUM_THREADS"))
    lm = load_model(args.model)
    model, tokenizer = lm.model, lm.tokenizer
    editor = editkit.get_editor("rome", lm)
    prefixes = editor.prefixes  # sampled once, before timing; editkit reuses them on every edit
    rome_main.CONTEXT_TEMPLATES_CACHE = [prefix + "{}" for prefix in prefixes]
    hparams = reference_hparams(ROMEHyperParams, editor.params, lm.adapter)
    log.info("editkit params: %s\nreference hparams: %s", editor.params, hparams)
    log.info("%d context prefixes; reference templates = [prefix + '{}']", len(prefixes))
    by_case = {r.case_id: r for r in load_edit_requests("counterfact", "edit", max(args.requests) + 1)}
    missing = sorted(set(args.requests) - set(by_case))
    if missing:
        raise ValueError(f"no CounterFact edit case with id {missing}")
    requests = [by_case[c] for c in args.requests]
    for r in requests:
        log.info("request %s: %r subject=%r new=%r", r.case_id, r.prompt, r.subject, r.target_new)

    log.info("== preflight: editkit vs reference inputs ==")
    for r in requests:
        preflight(tokenizer, repr_tools, prefixes, r)

    weight_path = editor.weight_path
    weight = model.get_parameter(weight_path)
    original = weight.detach().clone()
    times = {r.case_id: {"editkit": [], "reference": []} for r in requests}
    deltas = {r.case_id: {"editkit": [], "reference": []} for r in requests}
    loads = {r.case_id: [] for r in requests}
    with open(args.out / "ref_stdout.log", "w") as stdout_log:
        sides = {
            "editkit": lambda r: run_editkit(editor, weight, original, r),
            "reference": lambda r: run_reference(apply_rome_to_model, model, tokenizer, hparams, weight_path,
                                                 original, r, stdout_log),
        }
        warm = {side: run(requests[0])[0] for side, run in sides.items()}
        log.info("warm-up (not counted): editkit %.2f s, reference %.2f s", warm["editkit"], warm["reference"])
        log.info("== timed: %d reps, interleaved (even reps editkit first, odd reps reference first) ==", args.reps)
        for rep in range(args.reps):
            order = ("editkit", "reference") if rep % 2 == 0 else ("reference", "editkit")
            for r in requests:
                for side in order:
                    seconds, delta = sides[side](r)
                    times[r.case_id][side].append(seconds)
                    deltas[r.case_id][side].append(delta)
                    loads[r.case_id].append(os.getloadavg()[0])
                    log.info("rep %d request %s %-9s %7.2f s  |dW|=%.6f", rep, r.case_id, side, seconds,
                             float(delta.norm()))

    rows = []
    for r in requests:
        c = r.case_id
        ek, ref = deltas[c]["editkit"][0], deltas[c]["reference"][0]
        editkit_s, reference_s = statistics.median(times[c]["editkit"]), statistics.median(times[c]["reference"])
        rows.append({
            "case_id": c, "editkit_s": round(editkit_s, 3), "reference_s": round(reference_s, 3),
            "ratio": round(reference_s / editkit_s, 3), "rel_diff": float((ek - ref).norm() / ref.norm()),
            "cos": float(torch.nn.functional.cosine_similarity(ek.flatten(), ref.flatten(), dim=0)),
            "deterministic_editkit": all(torch.equal(ek, d) for d in deltas[c]["editkit"][1:]),
            "deterministic_reference": all(torch.equal(ref, d) for d in deltas[c]["reference"][1:]),
            "load_avg": round(statistics.mean(loads[c]), 2),
        })
    log.info("== results (seconds per edit = median of %d reps) ==", args.reps)
    log.info("%6s %10s %12s %7s %10s %11s %9s", "case", "editkit s", "reference s", "ratio", "rel diff", "cos",
             "load avg")
    for row in rows:
        log.info("%6s %10.2f %12.2f %7.2f %10.3e %11.8f %9.2f", row["case_id"], row["editkit_s"],
                 row["reference_s"], row["ratio"], row["rel_diff"], row["cos"], row["load_avg"])
    total_ek, total_ref = sum(row["editkit_s"] for row in rows), sum(row["reference_s"] for row in rows)
    worst = max(row["rel_diff"] for row in rows)
    log.info("%6s %10.2f %12.2f %7.2f %10.3e (max)", "all", total_ek, total_ref, total_ref / total_ek, worst)
    log.info("raw times: %s", {c: {k: [round(x, 3) for x in v] for k, v in t.items()} for c, t in times.items()})
    log.info("load average after: %s", os.getloadavg())
    with open(args.out / "edits.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (args.out / "summary.json").write_text(json.dumps(
        {"model": args.model, "threads": args.threads, "reps": args.reps, "torch": torch.__version__,
         "reference": str(args.reference), "weight": weight_path, "editkit_s": round(total_ek, 3),
         "reference_s": round(total_ref, 3), "ratio": round(total_ref / total_ek, 3), "max_rel_diff": worst,
         "warm_up_s": warm, "times": times, "edits": rows}, indent=2))
    log.info("wrote %s", args.out)
    return rows


if __name__ == "__main__":
    main()

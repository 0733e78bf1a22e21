"""Single-edit quality of an editor over the first N edit records (restored between edits).

Reports reliability, generalisation and locality in every convention (prob, token, gen), and edit latency,
for each candidate layer. Used to choose ROME's layer for the offline models::

    python scripts/edit_sweep.py --editor rome --layers 2 4 8 12 --n 10
    python scripts/edit_sweep.py --editor rome --layers 4 --n 50 --out results/sweeps/rome_l4.csv
    python scripts/edit_sweep.py --editor kn --n 10 --set lr_scale=2.0

Without ``--layers`` the editor's packaged defaults for the model are used; ``--set``
overrides any hyperparameter (values parsed as YAML).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import pandas as pd
import yaml
from tqdm.auto import tqdm

import editkit
from editkit.datasets import load_counterfact
from editkit.edit_metrics import edit_quality, locality_reference


def sweep(model: str, editor_name: str, layers: list[int] | None, n: int,
          overrides: dict | None = None) -> pd.DataFrame:
    lm = editkit.load_model(model)
    requests = load_counterfact("edit", n)
    reference = locality_reference(lm, requests)
    rows = []
    for layer in layers or [None]:
        chosen = {} if layer is None else {"layers": [layer]}
        editor = editkit.get_editor(editor_name, lm, **chosen, **(overrides or {}))
        getattr(editor, "prefixes", None)  # sample context templates once, outside the timings
        getattr(editor, "prepare", lambda: None)()  # UltraEdit's warm-up statistics, outside them too
        for request, ref in tqdm(list(zip(requests, reference)), desc=f"{editor_name} layer {layer}"):
            started = time.perf_counter()
            handle = editor.edit(request)
            seconds = time.perf_counter() - started
            quality = edit_quality(lm, [request], [ref]).iloc[0].to_dict()
            handle.restore()
            rows.append({"layer": "default" if layer is None else layer, **quality, "edit_seconds": seconds})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--editor", default="rome")
    parser.add_argument("--layers", type=int, nargs="+", default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="hyperparameter override, e.g. --set v_num_grad_steps=10 (repeatable)")
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("results/sweeps/edit_sweep.csv"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    frame = sweep(args.model, args.editor, args.layers, args.n, overrides)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out, index=False)
    summary = frame.drop(columns="case_id").groupby("layer").mean().round(3)
    summary["n"] = frame.groupby("layer").size()
    print(summary.to_string())  # noqa: T201 (a script's report)


if __name__ == "__main__":
    main()

"""Markdown tables of editor measurements: single-edit quality and sequential runs.

Reads the CSVs written by ``scripts/edit_sweep.py`` and the run folders written by
``python -m editkit run parameters/01_number_of_edits/editors.yaml``::

    python scripts/editor_table.py --sweeps results/sweeps --study results/01_number_of_edits/editors
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from editkit.edit_metrics import CONVENTIONS
from editkit.results import load_results

QUALITY = ("reliability", "generalization", "locality")


def _mean_cell(frame: pd.DataFrame, column: str) -> str:
    """The column's mean to two places; "–" where the column is missing (a sweep saved before it existed) or empty."""
    mean = frame[column].mean() if column in frame else float("nan")
    return "–" if pd.isna(mean) else f"{mean:.2f}"


def single_edit_table(folder: Path, suffix: str = "_n50.csv") -> str:
    """One row per editor: mean prob / token / gen scores and seconds per edit."""
    rows = []
    for path in sorted(folder.glob(f"*{suffix}")):
        frame = pd.read_csv(path)
        cells = [" / ".join(_mean_cell(frame, f"{m}_{c}") for c in CONVENTIONS) for m in QUALITY]
        rows.append(f"| `{path.name[:-len(suffix)]}` | {len(frame)} | " + " | ".join(cells)
                    + f" | {frame['edit_seconds'].mean():.1f} |")
    spelled = " / ".join(CONVENTIONS)
    header = (f"| editor | records | reliability ({spelled}) | generalisation ({spelled}) "
              f"| locality ({spelled}) | s/edit |\n|---|---|---|---|---|---|")
    return "\n".join([header, *rows])


def sequential_table(folder: Path, task: str = "mmlu_cloze") -> str:
    """Accuracy with CI and retention (prob convention) at every checkpoint, per method."""
    study = load_results(folder)
    if not len(study.scores):
        return "(no finished checkpoints)"
    scores = study.scores.query("task == @task and metric == 'acc'")
    quality = study.edit_quality.query("scope == 'retention' and convention == 'prob'") \
        if len(study.edit_quality) else study.edit_quality
    lines = ["| editor | edits | cloze-MMLU acc [95% CI] | retention reliability / generalisation / locality |"
             " status |", "|---|---|---|---|---|"]
    for (method, n_edits), row in scores.groupby(["method", "n_edits"], sort=True):
        score = row.iloc[0]
        kept = quality[(quality["method"] == method) & (quality["n_edits"] == n_edits)]
        values = {m: kept.loc[kept["metric"] == m, "value"] for m in QUALITY}
        retention = " / ".join(f"{v.iloc[0]:.2f}" if len(v) else "–" for v in values.values())
        lines.append(f"| `{method}` | {n_edits} | {score['value']:.3f} [{score['ci_low']:.3f}, {score['ci_high']:.3f}]"
                     f" | {retention} | {score['status']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweeps", type=Path, default=Path("results/sweeps"))
    parser.add_argument("--study", type=Path, default=Path("results/01_number_of_edits/editors"))
    args = parser.parse_args()
    sys.stdout.write(single_edit_table(args.sweeps) + "\n\n" + sequential_table(args.study) + "\n")


if __name__ == "__main__":
    main()

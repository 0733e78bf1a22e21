"""scripts/finding_4_1.py: the export is computed from the root, and carries over what only an earlier export has."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def script():
    spec = importlib.util.spec_from_file_location("finding_4_1", ROOT / "scripts" / "finding_4_1.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_methods_only_in_the_earlier_export_are_carried_over_and_named(saved_root, tmp_path):
    export = script()
    root, _ = saved_root
    out = tmp_path / "out"
    assert export.main(["--root", str(root), "--out", str(out), "--methods", "rome", "memit", "--no-figure"]) == 0
    fresh = pd.read_parquet(out / "checkpoints.parquet")
    assert set(fresh["method"]) == {"rome"} and "Carried over" not in (out / "table.md").read_text()
    for name in export.Frames.NAMES:  # an earlier export that also holds a MEMIT run
        frame = pd.read_parquet(out / f"{name}.parquet")
        pd.concat([frame, frame.assign(method="memit")]).to_parquet(out / f"{name}.parquet", index=False)
    assert export.main(["--root", str(root), "--out", str(out), "--methods", "rome", "memit", "--no-figure"]) == 0
    merged = pd.read_parquet(out / "checkpoints.parquet")
    assert merged.groupby("method").size().to_dict() == {"memit": len(fresh), "rome": len(fresh)}, \
        "MEMIT carried over once; ROME from the root, not doubled"
    table = (out / "table.md").read_text()
    assert "| memit |" in table and table.rstrip().endswith("memit.")
    assert len(pd.read_parquet(out / "deltas.parquet").query("method == 'memit'")) == len(
        pd.read_parquet(out / "deltas.parquet").query("method == 'rome'")) > 0

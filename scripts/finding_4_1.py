"""Finding 4.1 on the offline model: compact tables, a figure and the comparison with the paper.

Reads the sequential runs of ``parameters/01_number_of_edits/finding_4_1_{fast,slow}.yaml``
(one results root) and writes, under ``--out`` (committed; no weights, no per-item rows):

* ``scores.parquet``, ``deltas.parquet``, ``health.parquet`` (summary rows),
  ``edit_quality.parquet`` and ``checkpoints.parquet``: the compact results;
* ``table.md``: per method, the checkpoints reached, the collapse (if any), the first
  checkpoint with a significant paired drop (Holm-corrected across the run's
  checkpoints, accuracy and log-likelihood), held-out perplexity and norm growth at
  every checkpoint, and retention at the last checkpoint;
* ``comparison.md``: the paper's ordering (KN first; ROME before MEMIT, PMET and
  AlphaEdit; GRACE and SERAC flat), each claim checked against these results;
* ``finding_4_1.{png,html}``: paired log-likelihood change and health against the
  number of edits.

Everything is computed from the saved runs; rerun after the runs advance. The root is committed
weight-free (``.gitignore``), so a fresh clone resumes the runs by replaying their edits. A method
that an earlier export under ``--out`` holds but ``--root`` does not (runs made before the root
was committed) is carried over from that export's parquet files, and ``table.md`` names it.

    python scripts/finding_4_1.py --root results/finding_4_1 --out results/findings/finding_4_1

Issue 18's sequential table (``parameters/01_number_of_edits/frontier_200.yaml``, same root): the
frontier editors beside MEMIT and AlphaEdit, with ``frontier.md`` instead of ``comparison.md``::

    python scripts/finding_4_1.py --root results/finding_4_1 --out results/findings/frontier_200 \
        --methods ike emmet encore ultraedit wise memit alphaedit --frontier 200
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from editkit.paired import first_significant_drop
from editkit.results import load_results

log = logging.getLogger("finding_4_1")

PAPER = ["kn", "ft", "rome", "r-rome", "memit", "pmet", "alphaedit", "mend", "serac", "grace"]  # Finding 4.1's
ORDER = [*PAPER, "ike", "emmet", "encore", "ultraedit", "wise"]
SLOW = ("rome", "r-rome", "memit", "pmet", "alphaedit")
FRONTIER = ("ike", "emmet", "encore", "ultraedit", "wise")  # issue 18's editors, set against MEMIT and AlphaEdit


@dataclass(frozen=True)
class Frames:
    """The compact frames an export is made of (``health`` with its ``parameter`` column: NaN on summary rows)."""

    scores: pd.DataFrame
    deltas: pd.DataFrame
    health: pd.DataFrame
    edit_quality: pd.DataFrame
    checkpoints: pd.DataFrame

    NAMES = ("scores", "deltas", "health", "edit_quality", "checkpoints")

    @classmethod
    def of(cls, results) -> Frames:
        health = results.health[results.health["parameter"].isna()] if len(results.health) else results.health
        return cls(results.scores, results.deltas, health, results.edit_quality, results.checkpoints)

    @classmethod
    def read(cls, folder: Path) -> Frames | None:
        """An earlier export under ``folder``; None when it has none."""
        if not all((folder / f"{name}.parquet").is_file() for name in cls.NAMES):
            return None
        frames = {name: pd.read_parquet(folder / f"{name}.parquet") for name in cls.NAMES}
        frames["health"] = frames["health"].assign(parameter=np.nan)  # exported without it: summary rows only
        return cls(**frames)

    def methods(self) -> set[str]:
        return set(self.checkpoints["method"])

    def plus(self, other: Frames, methods: set[str]) -> Frames:
        """These frames with ``other``'s rows of ``methods``."""
        return Frames(*(pd.concat([getattr(self, n), getattr(other, n)[getattr(other, n)["method"].isin(methods)]],
                                  ignore_index=True) for n in self.NAMES))

    def write(self, folder: Path) -> None:
        for name in self.NAMES:
            frame = self.health.drop(columns=["parameter"]) if name == "health" else getattr(self, name)
            frame.to_parquet(folder / f"{name}.parquet", index=False)


def _fmt(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if not np.isfinite(value):
        return "inf"
    return f"{value:.{digits}g}"


def _first_drops(deltas: pd.DataFrame) -> pd.DataFrame:
    frames = []
    for metric in ("acc", "loglik"):
        if metric in set(deltas["metric"]):
            frames.append(first_significant_drop(deltas, metric=metric)[["method", "task", "first_drop"]]
                          .assign(metric=metric))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["method", "task", "first_drop", "metric"])


def _series(frame: pd.DataFrame, method: str, metric: str) -> str:
    rows = frame[(frame["method"] == method) & (frame["metric"] == metric)].sort_values("n_edits")
    return ", ".join(f"{n}: {_fmt(v)}" for n, v in zip(rows["n_edits"], rows["value"])) or "–"


def method_table(results, drops: pd.DataFrame, health: pd.DataFrame) -> pd.DataFrame:
    rows = []
    checkpoints = results.checkpoints
    quality = results.edit_quality
    for method in [m for m in ORDER if m in set(checkpoints["method"])]:
        mine = checkpoints[checkpoints["method"] == method].sort_values("n_edits")
        ok = mine[mine["status"] == "ok"]
        collapsed = mine[mine["status"] == "collapsed"]
        last = int(ok["n_edits"].max()) if len(ok) else 0
        kept = quality[(quality["method"] == method) & (quality["n_edits"] == last)
                       & (quality["scope"] == "retention") & (quality["metric"] == "reliability")]
        by_convention = dict(zip(kept["convention"], kept["value"]))
        first = drops[drops["method"] == method].groupby("metric")["first_drop"].min()  # over tasks
        rows.append({
            "method": method,
            "checkpoints": ", ".join(str(n) for n in mine["n_edits"]),
            "collapse": (f"{int(collapsed['n_edits'].min())}: {collapsed['reason'].iloc[0]}" if len(collapsed)
                         else "none"),
            "first drop (acc)": _na(first.get("acc")),
            "first drop (log-lik)": _na(first.get("loglik")),
            "held-out ppl ÷ unedited": _series(health, method, "heldout_ppl_ratio"),
            "max ‖W−W₀‖/‖W₀‖": _series(health, method, "max_rel_norm_growth"),
            "retention at last ok N (prob / gen)": (
                f"N={last}: {_fmt(by_convention.get('prob'))} / {_fmt(by_convention.get('gen'))}"),
        })
    return pd.DataFrame(rows)


def _markdown(frame: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _na(value) -> str:
    return "none" if value is None or pd.isna(value) else str(int(value))


def comparison(table: pd.DataFrame, drops: pd.DataFrame, results) -> list[str]:
    """The paper's ordering, each claim with what these runs say (computed, not typed)."""
    first = {}
    for method in set(drops["method"]):
        values = drops[(drops["method"] == method) & (drops["metric"] == "loglik")]["first_drop"].dropna()
        first[method] = int(values.min()) if len(values) else math.inf
    checkpoints = results.checkpoints
    ok = checkpoints[checkpoints["status"] == "ok"]
    reached = ok.groupby("method")["n_edits"].max().to_dict()
    collapsed = checkpoints[checkpoints["status"] == "collapsed"].groupby("method")["n_edits"].min().to_dict()
    lines = ["| paper (Li et al. 2024, Finding 4.1) | these runs (SmolLM2-135M-Instruct, cloze CSQA, paired log-lik) "
             "| agrees |", "|---|---|---|"]

    def claim(text: str, detail: str, verdict: bool | None) -> None:
        mark = "not yet measured" if verdict is None else ("yes" if verdict else "no")
        lines.append(f"| {text} | {detail} | {mark} |")

    def when(method: str) -> str:
        if method not in reached:
            return f"{method}: not run"
        value = first.get(method, math.inf)
        stop = f", collapsed at {collapsed[method]}" if method in collapsed else ""
        drop = "no drop" if value == math.inf else f"first drop at {value}"
        return f"{method}: {drop} (measured to {reached[method]}{stop})"

    def damage(method: str) -> tuple[float, float]:  # earlier drop first, then earlier collapse
        return first.get(method, math.inf), collapsed.get(method, math.inf)

    others = [m for m in first if m != "kn"]
    if "kn" in first and others:
        earliest = min(others, key=damage)
        claim("KN damages first (collapses within 10 edits)", f"{when('kn')}; next: {when(earliest)}",
              damage("kn") < damage(earliest) and collapsed.get("kn", math.inf) <= 10)
    else:
        claim("KN damages first", when("kn"), None)
    for other in ("memit", "pmet", "alphaedit"):
        if "rome" in first and other in first:
            claim(f"ROME degrades before {other.upper() if other != 'alphaedit' else 'AlphaEdit'}",
                  f"{when('rome')}; {when(other)}", first["rome"] < first[other])
        else:
            claim(f"ROME degrades before {other}", f"{when('rome')}; {when(other)}", None)
    for lasting in ("mend", "pmet"):  # the paper: PMET and MEND scale to thousands of edits
        top = 1000 if lasting == "mend" else 200  # what finding_4_1_{fast,slow}.yaml ask for
        # a collapse answers no at once; a run still short of ``top`` has not answered yet
        verdict = None if lasting not in first else (
            False if lasting in collapsed else (True if reached.get(lasting, 0) >= top else None))
        claim(f"{lasting.upper()} keeps working through {top} edits", when(lasting), verdict)
    for flat in ("grace", "serac"):
        claim(f"{flat.upper()} stays flat", when(flat), None if flat not in first else first[flat] == math.inf)
    return lines


def frontier(results, n_edits: int = 200) -> list[str]:
    """Issue 18's question at ``n_edits``: which new editor holds general ability and retention best,
    against MEMIT and AlphaEdit. General ability: the paired change of the gold answer's log-likelihood
    against the unedited model (mean over tasks; closer to 0 is better) and held-out perplexity;
    retention: reliability of every edit so far (prob and gen)."""
    deltas, quality, health = results.deltas, results.edit_quality, results.health
    checkpoints = results.checkpoints
    ok = checkpoints[(checkpoints["status"] == "ok") & (checkpoints["n_edits"] == n_edits)]
    rows = []
    for method in [m for m in ORDER if m in set(ok["method"]) and (m in FRONTIER or m in ("memit", "alphaedit"))]:
        d = deltas[(deltas["method"] == method) & (deltas["n_edits"] == n_edits) & (deltas["metric"] == "loglik")]
        a = deltas[(deltas["method"] == method) & (deltas["n_edits"] == n_edits) & (deltas["metric"] == "acc")]
        q = quality[(quality["method"] == method) & (quality["n_edits"] == n_edits) & (quality["scope"] == "retention")
                    & (quality["metric"] == "reliability")]
        h = health[(health["method"] == method) & (health["n_edits"] == n_edits)
                   & (health["metric"] == "heldout_ppl_ratio") & health["parameter"].isna()]
        conv = dict(zip(q["convention"], q["value"]))
        rows.append({"method": method, "loglik": d["delta"].mean(), "lo": d["ci_low"].mean(), "hi": d["ci_high"].mean(),
                     "p": d["p_value"].min(), "acc": a["delta"].mean(), "ppl": h["value"].mean(),
                     "prob": conv.get("prob", math.nan), "gen": conv.get("gen", math.nan)})
    lines = [f"| method ({n_edits} edits) | Δ log-lik [95% CI], p | Δ accuracy | held-out ppl ÷ unedited "
             "| retention (prob / gen) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {_fmt(r['loglik'])} [{_fmt(r['lo'])}, {_fmt(r['hi'])}], p={_fmt(r['p'], 2)} "
                     f"| {_fmt(r['acc'])} | {_fmt(r['ppl'])} | {_fmt(r['prob'])} / {_fmt(r['gen'])} |")
    new = [r for r in rows if r["method"] in FRONTIER]
    base = [r for r in rows if r["method"] not in FRONTIER]
    missing = [m for m in (*FRONTIER, "memit", "alphaedit") if m not in {r["method"] for r in rows}]
    lines.append("")
    if missing:
        lines.append(f"Not yet at {n_edits} edits: {', '.join(missing)}.")
    if new:
        ability = max(new, key=lambda r: (r["loglik"], -r["ppl"]))
        fluent = min(new, key=lambda r: (r["ppl"], -r["loglik"]))
        retention = max(new, key=lambda r: (r["prob"], r["gen"]))
        lines.append(f"Among the new editors at {n_edits} edits, {ability['method']} holds general ability best "
                     f"(Δ log-lik {_fmt(ability['loglik'])}, perplexity ×{_fmt(ability['ppl'])}) and "
                     f"{retention['method']} retention (prob {_fmt(retention['prob'])}, gen {_fmt(retention['gen'])}).")
        if fluent is not ability:
            lines.append(f"By held-out perplexity alone {fluent['method']} holds best (×{_fmt(fluent['ppl'])}, "
                         f"Δ log-lik {_fmt(fluent['loglik'])}): the two measures disagree.")
        for r in base:
            lines.append(f"Against {r['method']} (Δ log-lik {_fmt(r['loglik'])}, retention {_fmt(r['prob'])} / "
                         f"{_fmt(r['gen'])}): {ability['method']} "
                         f"{'keeps' if ability['loglik'] >= r['loglik'] else 'loses'} more general ability; "
                         f"{retention['method']} {'retains' if retention['prob'] >= r['prob'] else 'loses'} "
                         f"{'at least as many' if retention['prob'] >= r['prob'] else 'more'} edits (prob).")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="results/finding_4_1")
    parser.add_argument("--out", default="results/findings/finding_4_1")
    parser.add_argument("--no-figure", action="store_true")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="only these methods (default: the paper's ten; with --frontier, all under --root)")
    parser.add_argument("--frontier", type=int, default=None, metavar="N",
                        help="also write frontier.md: issue 18's editors against MEMIT and AlphaEdit at N edits")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    results = load_results(args.root)
    methods = args.methods or (None if args.frontier else PAPER)
    if methods:
        results = results.select(method=methods)
    out = Path(args.out)
    results = Frames.of(results)
    earlier = Frames.read(out)
    carried = set() if earlier is None else {m for m in earlier.methods() - results.methods()
                                             if methods is None or m in methods}
    if carried:
        log.info("not under %s, carried over from the export in %s: %s", args.root, out, ", ".join(sorted(carried)))
        results = results.plus(earlier, carried)
    if results.checkpoints.empty:
        log.error("no runs under %s", args.root)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    results.write(out)
    deltas, health = results.deltas, results.health
    drops = _first_drops(deltas)
    table = method_table(results, drops, health)
    note = (f"\n\nCarried over from the earlier export (runs made before `{args.root}` was committed): "
            f"{', '.join(m for m in ORDER if m in carried)}.") if carried else ""
    (out / "table.md").write_text(_markdown(table) + note + "\n", encoding="utf-8")
    if args.frontier:  # issue 18's comparison instead of the paper's ordering
        (out / "frontier.md").write_text("\n".join(frontier(results, args.frontier)) + "\n", encoding="utf-8")
    else:
        (out / "comparison.md").write_text("\n".join(comparison(table, drops, results)) + "\n", encoding="utf-8")
    if not args.no_figure and len(deltas):
        from editkit.viz import save_chart
        from editkit.viz_instruments import delta_curves, health_curves

        chart = delta_curves(deltas, metric="loglik") & delta_curves(deltas, metric="acc") & health_curves(
            results.health, metrics=["heldout_ppl_ratio", "max_rel_norm_growth"])
        save_chart(chart, out / (f"frontier_{args.frontier}" if args.frontier else "finding_4_1"))
    verdict = out / ("frontier.md" if args.frontier else "comparison.md")
    sys.stdout.write(_markdown(table) + "\n\n" + verdict.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

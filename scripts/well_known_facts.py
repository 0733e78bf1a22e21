"""Single edits of well-known facts to false targets: does the edit overturn a strong prior?

Each fact of ``tests/data/well_known_facts.json`` (12 facts the unedited model knows, kept apart
from CounterFact: the Colosseum to London, and the like) is edited alone and restored. A fact
counts as flipped when, after its edit, P(new) > P(true) on its prompt, scored by editkit's
engine. Reports per editor: facts the unedited model gets right, flips, and the mean rise of
log P(new)::

    python scripts/well_known_facts.py --editor serac --set counterfactual=trained
    python scripts/well_known_facts.py --editor serac rome mend --out results/sweeps/well_known.csv

``--set`` overrides hyperparameters of every editor named (values parsed as YAML).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pandas as pd
import yaml

import editkit
from editkit.benchmarks import Engine
from editkit.types import EditRequest

FACTS = Path(__file__).resolve().parent.parent / "tests" / "data" / "well_known_facts.json"


def load_facts(path: Path = FACTS) -> list[EditRequest]:
    return [EditRequest(**record) for record in json.loads(path.read_text())]


def scores(engine: Engine, facts: list[EditRequest]) -> list[tuple[float, float]]:
    """(log P(new), log P(true)) on each fact's prompt."""
    pairs = [(f.prompt, " " + t) for f in facts for t in (f.target_new, f.target_true)]
    values = [s.logprob for s in engine.score(pairs)]
    return list(zip(values[0::2], values[1::2]))


def run(model: str, editor_name: str, overrides: dict) -> pd.DataFrame:
    lm = editkit.load_model(model)
    facts = load_facts()
    engine = Engine(lm, batch_size=8, progress=False)
    before = scores(engine, facts)
    editor = editkit.get_editor(editor_name, lm, **overrides)
    rows = []
    for fact, (new0, true0) in zip(facts, before):
        handle = editor.edit(fact)
        (new1, true1), = scores(engine, [fact])
        handle.restore()
        rows.append({"editor": editor_name, "case_id": fact.case_id, "known": true0 > new0,
                     "flipped": new1 > true1, "gain_new": new1 - new0, "loss_true": true0 - true1})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--editor", nargs="+", default=["serac"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    table = pd.concat([run(args.model, name, overrides) for name in args.editor])
    summary = table.groupby("editor").agg(known=("known", "sum"), flipped=("flipped", "sum"), n=("flipped", "size"),
                                          mean_gain_new=("gain_new", "mean"))
    logging.getLogger("well_known").warning("\n%s\n%s", table.to_string(index=False), summary.to_string())
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False)


if __name__ == "__main__":
    main()

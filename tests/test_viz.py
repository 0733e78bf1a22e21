"""Chart builders and the checkpoint explorer, on synthetic frames in StudyResult's schema."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

alt = pytest.importorskip("altair")
pytest.importorskip("ipywidgets")

from editkit.viz import edit_quality_curves, save_chart, score_curves  # noqa: E402
from editkit.widgets import (  # noqa: E402
    CheckpointExplorer,
    checkpoint_explorer,
    edit_quality_at,
    generations_at,
    scores_at,
)

MODEL = "smollm2-135m-instruct"
CHECKPOINTS = [0, 1, 5, 10, 20]
# (task, metric, unedited value); "mmlu/anatomy" is a per-subject row hidden by default.
SCORE_ROWS = [
    ("mmlu_cloze", "acc", 0.30),
    ("mmlu_cloze", "acc_norm", 0.32),
    ("gsm8k", "exact_match", 0.04),
    ("gsm8k", "unusable_rate", 0.10),
    ("mmlu/anatomy", "acc", 0.30),
]
# run_id -> (method, the first checkpoint at which the model collapsed, or None)
RUNS = {"run-rome": ("rome", 20), "run-memit": ("memit", None)}


def _value(base: float, method: str, n_edits: int) -> float:
    return max(base - (0.01 if method == "rome" else 0.002) * n_edits, 0.0)


@pytest.fixture(scope="module")
def result() -> SimpleNamespace:
    """A StudyResult look-alike: two methods, ROME collapsed at 20 edits."""
    scores, quality, generations, checkpoints = [], [], [], []
    for run_id, (method, collapse_at) in RUNS.items():
        ids = {"run_id": run_id, "model": MODEL, "method": method}
        for n in CHECKPOINTS:
            collapsed = collapse_at is not None and n >= collapse_at
            status = "collapsed" if collapsed else "ok"
            checkpoints.append({**ids, "n_edits": n, "status": status,
                                "reason": "non-finite logits" if collapsed else None,
                                "edit_seconds": 0.5 * n, "eval_seconds": 3.0})
            for task, metric, base in SCORE_ROWS:
                value = math.nan if collapsed else _value(base, method, n)
                scores.append({**ids, "n_edits": n, "task": task, "metric": metric, "value": value,
                               "ci_low": value - 0.05, "ci_high": value + 0.05, "n": 57, "status": status})
            if n > 0 and not collapsed:
                for scope in ("latest", "retention"):
                    for metric, base in (("reliability", 0.95), ("generalization", 0.7), ("locality", 0.8)):
                        for convention in ("prob", "token"):
                            value = base - 0.01 * n
                            quality.append({**ids, "n_edits": n, "scope": scope, "metric": metric,
                                            "convention": convention, "value": value, "ci_low": value - 0.1,
                                            "ci_high": min(value + 0.1, 1.0), "n": n})
            for i in range(4):
                generations.append({**ids, "n_edits": n, "prompt": f"Probe {i}: <b>bold</b>?",
                                    "output": f"{method} answer {i} after {n}"})
    return SimpleNamespace(
        results_dir=Path("synthetic"),
        scores=pd.DataFrame(scores),
        edit_quality=pd.DataFrame(quality),
        generations=pd.DataFrame(generations),
        checkpoints=pd.DataFrame(checkpoints),
    )


def _layers(spec: dict) -> list[dict]:
    return spec["spec"]["layer"]


def _mark(layer: dict) -> dict:
    mark = layer["mark"]
    return mark if isinstance(mark, dict) else {"type": mark}


def _data(spec: dict) -> pd.DataFrame:
    (rows,) = spec["datasets"].values()
    return pd.DataFrame(rows)


def test_score_curves_structure(result):
    spec = score_curves(result.scores).to_dict()
    layers = _layers(spec)
    # every layer but the full-width chance rule shares the symlog x scale, so 0 edits is on the axis
    for layer in layers:
        if _mark(layer)["type"] == "rule":
            assert "x" not in layer["encoding"]
            continue
        x = layer["encoding"]["x"]
        assert x["field"] == "n_edits"
        assert x["scale"]["type"] == "symlog"
        assert x["axis"]["values"] == CHECKPOINTS
    marks = [_mark(layer)["type"] for layer in layers]
    assert marks.count("area") == 1 and "line" in marks and "rule" in marks

    band = layers[marks.index("area")]
    assert band["encoding"]["y"]["field"] == "ci_low"
    assert band["encoding"]["y2"]["field"] == "ci_high"
    assert band["encoding"]["color"]["field"] == "method"
    assert band["encoding"]["color"]["scale"]["domain"] == ["memit", "rome"]

    collapse = [layer for layer in layers if _mark(layer).get("shape") == "cross"]
    assert len(collapse) == 1
    assert _mark(collapse[0])["color"] == "#d62728"
    assert collapse[0]["encoding"]["y"]["field"] == "collapse_y"
    assert any("datum.collapsed" in t["filter"] for t in collapse[0]["transform"])

    rule = layers[marks.index("rule")]
    assert _mark(rule)["strokeDash"]
    assert rule["encoding"]["y"]["field"] == "chance"

    assert spec["facet"]["field"] == "panel"
    assert spec["resolve"]["scale"]["y"] == "independent"


def test_score_curves_data(result):
    data = _data(score_curves(result.scores).to_dict())
    # per-subject rows are not drawn by default
    assert not data["task"].str.contains("/").any()
    assert set(data["panel"]) == {"mmlu_cloze · acc", "mmlu_cloze · acc_norm", "gsm8k · exact_match",
                                  "gsm8k · unusable_rate"}
    # collapsed checkpoints are marked at y=0 and never drawn as scores
    collapsed = data[data["collapsed"]]
    assert set(collapsed["n_edits"]) == {20} and set(collapsed["method"]) == {"rome"}
    assert (collapsed["collapse_y"] == 0).all() and collapsed["value"].isna().all()
    assert data.loc[~data["collapsed"], "collapse_y"].isna().all()
    # chance level: 0.25 for four-way MMLU accuracies, none for GSM8K or failure rates
    chance = data.groupby(["task", "metric"])["chance"].first()
    assert chance[("mmlu_cloze", "acc")] == 0.25
    assert pd.isna(chance[("gsm8k", "exact_match")]) and pd.isna(chance[("gsm8k", "unusable_rate")])


def test_score_curves_leave_out_failure_rates_that_never_rise(result):
    zeros = result.scores[result.scores["metric"] == "acc"].assign(metric="format_failure_rate", value=0.0)
    spec = score_curves(pd.concat([result.scores, zeros])).to_dict()
    assert "format_failure_rate" not in set(_data(spec)["metric"])
    assert "format_failure_rate: 0 throughout, not drawn" in spec["title"]["subtitle"]
    asked = _data(score_curves(pd.concat([result.scores, zeros]), metrics=["format_failure_rate"]).to_dict())
    assert set(asked["metric"]) == {"format_failure_rate"}, "drawn when asked for"


def test_score_curves_selection(result):
    data = _data(score_curves(result.scores, tasks=["mmlu/anatomy", "mmlu_cloze"], metrics=["acc"]).to_dict())
    assert set(data["panel"]) == {"mmlu/anatomy · acc", "mmlu_cloze · acc"}
    assert (data.loc[data["task"] == "mmlu/anatomy", "chance"].isna()).all()
    with pytest.raises(ValueError, match="no score rows"):
        score_curves(result.scores, tasks=["bbh"])


def test_score_curves_marks_several_models(result):
    scores = result.scores.copy()
    other = scores.assign(model="gpt2-xl", run_id=scores["run_id"] + "-xl")
    spec = score_curves(pd.concat([scores, other])).to_dict()
    line = next(layer for layer in _layers(spec) if _mark(layer)["type"] == "line")
    assert line["encoding"]["strokeDash"]["field"] == "model"
    assert line["encoding"]["detail"]["field"] == "run_id"


def test_edit_quality_curves_of_several_runs_colour_by_method(result):
    spec = edit_quality_curves(result.edit_quality).to_dict()
    assert spec["facet"]["row"]["field"] == "metric"
    assert spec["facet"]["column"]["field"] == "scope"
    layers = _layers(spec)
    marks = [_mark(layer)["type"] for layer in layers]
    band = layers[marks.index("area")]
    assert band["encoding"]["y2"]["field"] == "ci_high"
    line = layers[marks.index("line")]
    assert line["encoding"]["color"]["field"] == "series"
    assert line["encoding"]["color"]["scale"]["domain"] == ["memit", "rome"]
    assert line["encoding"]["x"]["scale"]["type"] == "symlog"
    data = next(iter(spec["datasets"].values()))
    assert {row["convention"] for row in data} == {"prob"}, "the study's convention unless asked"
    token = next(iter(edit_quality_curves(result.edit_quality, convention="token").to_dict()["datasets"].values()))
    assert {row["convention"] for row in token} == {"token"}
    with pytest.raises(ValueError, match="convention 'tokens'"):
        edit_quality_curves(result.edit_quality, convention="tokens")
    with pytest.raises(ValueError):
        edit_quality_curves(result.edit_quality.iloc[:0])


def test_edit_quality_curves_of_one_run_colour_by_metric(result):
    one = result.edit_quality[result.edit_quality["run_id"] == "run-memit"]
    spec = edit_quality_curves(one).to_dict()
    assert spec["facet"]["row"]["field"] == "scope"
    assert spec["facet"]["column"]["field"] == "convention"
    line = _layers(spec)[[_mark(layer)["type"] for layer in _layers(spec)].index("line")]
    assert line["encoding"]["color"]["field"] == "metric"
    assert line["encoding"]["color"]["scale"]["domain"] == ["reliability", "generalization", "locality"]


def test_save_chart_writes_html_and_png(result, tmp_path):
    paths = save_chart(score_curves(result.scores), tmp_path / "nested" / "figures" / "scores")
    assert [p.name for p in paths] == ["scores.html", "scores.png"]
    html, png = paths
    assert html.stat().st_size > 0 and "vega" in html.read_text()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scores_at(result):
    table = scores_at(result.scores, "run-rome", 10)
    row = table[(table["task"] == "mmlu_cloze") & (table["metric"] == "acc")].iloc[0]
    assert row["unedited"] == pytest.approx(0.30)
    assert row["edited"] == pytest.approx(0.20)
    assert row["change"] == pytest.approx(-0.10)
    assert not table["task"].str.contains("/").any()
    collapsed = scores_at(result.scores, "run-rome", 20)
    assert collapsed["edited"].isna().all() and set(collapsed["status"]) == {"collapsed"}
    assert scores_at(result.scores, "run-rome", 10, subjects=True)["task"].str.contains("/").any()


def test_edit_quality_and_generations_at(result):
    quality = edit_quality_at(result.edit_quality, "run-memit", 5)
    assert list(quality.columns) == ["scope", "metric", "prob", "token"]
    assert list(quality["metric"][:3]) == ["reliability", "generalization", "locality"]
    assert edit_quality_at(result.edit_quality, "run-memit", 0).empty
    pairs = generations_at(result.generations, "run-memit", 5, limit=3)
    assert list(pairs.columns) == ["prompt", "before", "after"] and len(pairs) == 3
    assert pairs["before"].iloc[0] == "memit answer 0 after 0"
    assert pairs["after"].iloc[0] == "memit answer 0 after 5"


def test_checkpoint_explorer(result):
    explorer = checkpoint_explorer(result, n_generations=2)
    assert isinstance(explorer, CheckpointExplorer)
    assert list(explorer.slider.options) == CHECKPOINTS
    assert explorer.slider.value == CHECKPOINTS[-1]
    # two runs -> the run dropdown is shown next to the slider
    assert explorer.run_selector in explorer.children[0].children
    assert [value for _, value in explorer.run_selector.options] == ["run-rome", "run-memit"]

    # the last ROME checkpoint collapsed, and says so
    assert "collapsed" in explorer.output.value and "non-finite logits" in explorer.output.value

    explorer.slider.value = 5
    explorer.update()  # the library callback, as the slider's observer would call it
    shown = explorer.output.value
    assert "rome after 5 edits" in shown
    assert "rome answer 0 after 0" in shown and "rome answer 0 after 5" in shown
    assert "rome answer 2 after 5" not in shown  # n_generations=2
    assert "&lt;b&gt;bold&lt;/b&gt;" in shown  # generations are escaped, not rendered
    assert "reliability" in shown

    explorer.run_selector.value = "run-memit"
    explorer.on_run_change()
    assert explorer.slider.value == 5
    assert "memit after 5 edits" in explorer.output.value


def test_checkpoint_explorer_single_run(result):
    single = SimpleNamespace(**{
        name: frame[frame["run_id"] == "run-memit"] if isinstance(frame, pd.DataFrame) else frame
        for name, frame in vars(result).items()
    })
    explorer = checkpoint_explorer(single)
    assert explorer.children[0].children == (explorer.slider,)
    assert "memit after 20 edits" in explorer.output.value
    explorer.slider.value = 0
    explorer.update()
    assert "no edit-quality rows" in explorer.output.value


def test_one_builder_with_axis_choices(result):
    from editkit.viz import curves

    frame = result.scores[(result.scores["task"] == "mmlu_cloze") & (result.scores["metric"] == "acc")]
    frame = frame.assign(n_params=frame["method"].map({"rome": 1.35e8, "memit": 2.7e8}), panel="mmlu_cloze")
    spec = curves(frame, x="n_params", color="model", facet="panel").to_dict()
    line = next(layer for layer in _layers(spec) if _mark(layer)["type"] == "line")
    assert line["encoding"]["x"]["field"] == "n_params" and line["encoding"]["x"]["scale"]["type"] == "log"
    assert line["encoding"]["color"]["field"] == "model"
    assert spec["facet"]["field"] == "panel"
    grid = curves(frame, row="method", column="task").to_dict()
    assert grid["facet"]["row"]["field"] == "method" and grid["facet"]["column"]["field"] == "task"
    with pytest.raises(ValueError, match=r"columns \['family'\]"):
        curves(frame, color="family")


def test_gen_convention_is_drawn_and_tabled_after_prob_and_token(result):
    one = result.edit_quality[result.edit_quality["run_id"] == "run-memit"]
    gen = one[one["convention"] == "token"].assign(convention="gen")
    three = pd.concat([gen, one], ignore_index=True)  # "gen" first: the order must not come from the rows
    spec = edit_quality_curves(three).to_dict()
    assert spec["facet"]["column"]["sort"] == ["prob", "token", "gen"]
    quality = edit_quality_at(three, "run-memit", 5)
    assert list(quality.columns) == ["scope", "metric", "prob", "token", "gen"]


def test_truthfulqa_chance_levels_are_those_of_the_packaged_questions():
    import numpy as np

    from editkit.benchmarks import get_task
    from editkit.viz import CHANCE_LEVELS

    for name, key in (("truthfulqa_mc1", "mc1_targets"), ("truthfulqa_mc2", "mc2_targets")):
        task = get_task(name)
        labels = [doc.fields[key]["labels"] for doc in task.load(task.eval_split)]
        assert CHANCE_LEVELS[name] == pytest.approx(np.mean([sum(x) / len(x) for x in labels]), abs=1e-4)

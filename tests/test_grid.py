"""The study grid: cells, the CLI over one YAML, one results root, resume per cell, old folders."""

from __future__ import annotations

import collections
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from editkit import protocol
from editkit.__main__ import main
from editkit.grid import StudyConfig
from editkit.results import load_results
from editkit.runs import cell_states, run_study

FIXTURES = Path(__file__).parent / "fixtures"
FAST_ROME = {"v_num_grad_steps": 3, "context_template_length_params": [[4, 2]]}
FAST_FT = {"num_steps": 3}


@pytest.fixture(scope="module")
def tiny_folder(tiny_llama_folder) -> str:
    return tiny_llama_folder


def grid_values(tiny_folder: str, results_dir: Path) -> dict:
    return {
        "models": ["smollm2-135m-instruct", tiny_folder],
        "methods": ["rome", "ft"],
        "editor_overrides": {"rome": FAST_ROME, "ft": FAST_FT},
        # per (model, method): the tiny model has 3 layers, so ROME's SmolLM2 layer does not exist there
        "model_overrides": {tiny_folder: {"editor_overrides": {"rome": {"layers": [1]}, "ft": {"layers": [1]}},
                                          "family": "tiny-llama"}},
        "n_edits": 2, "checkpoints": [0, 2], "tasks": ["mmlu_cloze"], "limit": 2, "max_new_tokens": 4,
        "n_generation_examples": 1, "heldout_chunks": 4, "results_dir": str(results_dir),
    }


def write_study(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def counting_measure(monkeypatch) -> collections.Counter:
    calls: collections.Counter = collections.Counter()
    original = protocol.CheckpointProtocol.measure

    def counted(self, engine, requests, *args, **kwargs):
        calls[(engine.lm.name, kwargs["journal_key"].split(" of ")[-1].split(",")[0], len(requests))] += 1
        return original(self, engine, requests, *args, **kwargs)

    monkeypatch.setattr(protocol.CheckpointProtocol, "measure", counted)
    return calls


def test_cells_cover_the_grid_model_major(tiny_folder, tmp_path):
    config = StudyConfig.from_dict({**grid_values(tiny_folder, tmp_path), "seeds": [0, 1]})
    cells = config.cells()
    assert len(cells) == 2 * 2 * 2
    assert [c.index for c in cells] == list(range(8))
    assert [c.model for c in cells[:4]] == ["smollm2-135m-instruct"] * 4, "one model's cells are consecutive"
    tiny_rome = next(c for c in cells if c.model == tiny_folder and c.method == "rome")
    assert tiny_rome.editor_overrides == {**FAST_ROME, "layers": [1]}, "per (model, method) over per method"
    assert len({c.run_id("same-params") for c in cells}) == 8, "every cell has its own folder"


def test_grid_of_two_models_and_two_methods_through_the_cli(tiny_folder, tmp_path, capsys, monkeypatch):
    calls = counting_measure(monkeypatch)
    study = write_study(tmp_path / "study.yaml", grid_values(tiny_folder, tmp_path / "out"))
    assert main(["run", str(study), "--list-cells"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 4 and all("pending" in line for line in listed)

    import editkit.models

    loads: list[str] = []
    real_load = editkit.models.load_model
    monkeypatch.setattr(editkit.models, "load_model", lambda name, **kw: loads.append(name) or real_load(name, **kw))
    assert main(["run", str(study), "--quiet", "--no-charts"]) == 0
    assert loads == ["smollm2-135m-instruct", tiny_folder], "each model loaded once for its two cells"
    # Checkpoint 0 (the unedited model) is measured once per model and copied to its other cell.
    assert sum(calls.values()) == 2 + 4 and set(calls.values()) == {1}
    assert sorted(n for _, _, n in calls) == [0, 0, 2, 2, 2, 2]
    results = load_results(tmp_path / "out")
    for frame in (results.scores, results.items, results.edit_quality, results.generations, results.checkpoints):
        for axis in ("run_id", "model", "method", "dataset", "seed", "edit_batch_size", "n_edits"):
            assert axis in frame.columns, axis
    cells = results.checkpoints.groupby(["model", "method"])["n_edits"].apply(sorted)
    assert cells.to_dict() == {(m, method): [0, 2] for m in ("smollm2-135m-instruct", tiny_folder)
                               for method in ("ft", "rome")}
    assert set(results.scores["dataset"]) == {"counterfact"} and set(results.scores["edit_batch_size"]) == {1}
    assert {"value", "ci_low", "ci_high", "task", "metric"} <= set(results.scores.columns)
    models = results.models.set_index("model")
    assert bool(models.loc["smollm2-135m-instruct", "instruct"]) is True
    assert models.loc[tiny_folder, "family"] == "tiny-llama", "declared in the study file"
    assert models.loc[tiny_folder, "n_layers"] == 3
    joined = results.with_models(results.scores)
    assert joined["n_params"].notna().all() and len(joined) == len(results.scores)

    assert main(["run", str(study), "--list-cells"]) == 0
    assert all("done" in line.split() for line in capsys.readouterr().out.splitlines())


def test_one_cell_at_a_time_and_a_kill_midway(tiny_folder, tmp_path, monkeypatch, capsys):
    calls = counting_measure(monkeypatch)
    values = grid_values(tiny_folder, tmp_path / "out")
    values["models"] = [tiny_folder]
    study = write_study(tmp_path / "study.yaml", values)
    assert main(["run", str(study), "--cell", "1", "--quiet", "--no-charts"]) == 0
    states = {row["cell"]: row["state"] for row in cell_states(StudyConfig.from_dict(values))}
    assert states == {0: "pending", 1: "done"}
    assert set(load_results(tmp_path / "out").checkpoints["method"]) == {"ft"}

    class Killed(Exception):
        pass

    def kill_at_first_checkpoint(n, run_id):
        if n == 0 and run_id.startswith("rome"):
            raise Killed

    config = StudyConfig.from_dict(values)
    with pytest.raises(Killed):
        run_study(config, progress=False, on_checkpoint=kill_at_first_checkpoint)
    states = {row["cell"]: row["state"] for row in cell_states(config)}
    assert states == {0: "1/2 checkpoints", 1: "done"}
    run_study(config, progress=False)
    # ft measured 0 and 2; rome copied ft's checkpoint 0 (the kill came after the copy) and measured 2.
    assert sum(calls.values()) == 3 and set(calls.values()) == {1}, f"each checkpoint once: {calls}"
    with pytest.raises(IndexError, match="has 2"):
        run_study(config, progress=False, cells=[2])


def test_a_results_folder_of_the_single_model_code_still_loads_and_resumes(make_tiny, tmp_path, monkeypatch):
    # Written by editkit at c8262af (before the grid) with a tiny Llama: rome, 2 edits, checkpoints 0, 1, 2.
    root = tmp_path / "legacy"
    shutil.copytree(FIXTURES / "legacy_rq1", root)
    results = load_results(root)
    assert sorted(results.checkpoints["n_edits"]) == [0, 1, 2]
    assert set(results.scores["dataset"]) == {"counterfact"} and set(results.scores["seed"]) == {0}
    assert set(results.scores["edit_batch_size"]) == {1} and set(results.scores["model"]) == {"tiny"}
    assert results.edit_quality["value"].notna().all() and len(results.items)

    calls = counting_measure(monkeypatch)
    old = StudyConfig.from_dict(dict(model="tiny", n_edits=3, checkpoints=[0, 1, 2, 3], tasks=["mmlu_cloze"],
                                     limit=2, max_new_tokens=4, n_generation_examples=1,
                                     editor_overrides={"rome": {"layers": [1], **FAST_ROME}}, results_dir=str(root)))
    run_study(old, progress=False, lm=make_tiny("llama"))
    assert list(calls) and all(n == 3 for _, _, n in calls), "the old run is extended, not redone"
    assert len(list(root.iterdir())) == 1


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model": "a", "models": ["b"]}, "either 'model' or 'models'"),
        ({"models": ["a", "a"]}, "twice"),
        ({"datasets": ["wiki"]}, "unknown dataset 'wiki'"),
        ({"methods": ["memit"], "edit_batch_size": [3], "n_edits": 10}, "not a multiple"),
        ({"methods": ["memit"], "edit_batch_size": [2], "n_edits": 4, "checkpoints": [0, 1, 4]}, "between two batches"),
        ({"model_overrides": {"other": {"dtype": "float16"}}}, "not in models"),
        ({"model_overrides": {"smollm2-135m-instruct": {"dtyp": "float16"}}}, "did you mean 'dtype'"),
        ({"model_overrides": {"smollm2-135m-instruct": {"editor_overrides": {"memit": {}}}}}, "not in methods"),
        ({"shuffle_edits": True, "shuffle_seed": 3}, "drop shuffle_seed"),
    ],
)
def test_grid_config_rejects_bad_values(changes, message):
    with pytest.raises(ValueError, match=message):
        StudyConfig.from_dict(changes)


def test_batched_editing_needs_a_batch_method():
    with pytest.raises(ValueError, match="rome edits one request at a time"):
        StudyConfig.from_dict(dict(methods=["memit", "rome"], edit_batch_size=[1, 2], n_edits=2))
    assert StudyConfig.from_dict(dict(methods=["memit", "ft"], edit_batch_size=[1, 2], n_edits=2)).cells()


def test_batched_cell_edits_in_steps_of_the_batch(make_tiny, tmp_path, monkeypatch):
    from editkit.editing import EditSession

    sizes: list[int] = []
    original = EditSession.apply

    def recording(self, requests):
        sizes.append(len(requests))
        return original(self, requests)

    monkeypatch.setattr(EditSession, "apply", recording)
    config = StudyConfig.from_dict(dict(model="tiny", methods=["ft"], edit_batch_size=[2], n_edits=4,
                                        editor_overrides={"ft": {"layers": [1], **FAST_FT}},
                                        tasks=["mmlu_cloze"], limit=1, n_generation_examples=1,
                                        results_dir=str(tmp_path)))
    assert config.checkpoint_list(2) == [0, 4], "default checkpoints that fall between batches"
    results = run_study(config, progress=False, lm=make_tiny("llama"))
    assert sizes == [2, 2]
    edits = pd.read_parquet(next(tmp_path.glob("*/checkpoints/000004/edits.parquet")))
    assert list(edits["edit"]) == [1, 2, 3, 4]
    assert set(results.checkpoints["edit_batch_size"]) == {2}


def test_model_metadata_from_catalog_matches_the_loaded_model(smollm2, tiny_folder):
    from editkit.modelinfo import describe_model

    catalog = describe_model("smollm2-135m-instruct")
    loaded = describe_model("smollm2-135m-instruct", lm=smollm2)
    assert catalog == loaded, "the catalog's counts are those of the converted model"
    assert (catalog.family, catalog.instruct, catalog.model_type) == ("smollm2", True, "llama")
    base = describe_model("gemma3-270m")
    assert (base.instruct, base.n_layers, base.model_type) == (False, 18, "gemma3_text")
    folder = describe_model(tiny_folder)
    assert (folder.model_type, folder.n_layers, folder.n_params) == ("llama", 3, None)
    assert describe_model("meta-llama/Llama-2-7b-chat-hf").instruct is True
    assert describe_model("meta-llama/Llama-2-7b-hf").instruct is False
    assert describe_model("mistralai/Mistral-7B-Instruct-v0.2").family == "mistral"
    assert describe_model("EleutherAI/pythia-1.4b", {"n_params": 1_414_647_808}).n_params == 1_414_647_808
    with pytest.raises(ValueError, match="unknown keys"):
        describe_model("gpt2-xl", {"size": 1})


def test_malformed_records_stop_the_study_unless_skipped(make_tiny, tmp_path):
    from editkit.types import InvalidRequestError

    values = dict(model="tiny", datasets=["zsre"], n_edits=55, checkpoints=[0], tasks=["mmlu_cloze"], limit=1,
                  n_generation_examples=1, max_new_tokens=2, results_dir=str(tmp_path),
                  editor_overrides={"rome": {"layers": [1], **FAST_ROME}})  # the 55 edits run: keep them cheap
    lm = make_tiny("llama")
    with pytest.raises(InvalidRequestError, match="54"):
        run_study(StudyConfig.from_dict(values), progress=False, lm=lm)
    skip = StudyConfig.from_dict({**values, "invalid_records": "skip"})
    run_study(skip, progress=False, lm=lm)
    (manifest,) = tmp_path.glob("*/manifest.json")
    import json

    case_ids = json.loads(manifest.read_text())["case_ids"]
    assert len(case_ids) == 55 and 54 not in case_ids


def test_each_dataset_edits_its_own_split():
    config = StudyConfig.from_dict({"datasets": ["counterfact", "zsre"]})
    assert [(c.dataset, c.split()) for c in config.cells()] == [("counterfact", "edit"), ("zsre", "eval")]
    with pytest.raises(ValueError, match="'edit' is not a split of zsre"):
        StudyConfig.from_dict({"datasets": ["counterfact", "zsre"], "split": "edit"})


class _Loaded(Exception):
    pass


def test_a_finished_cell_does_not_load_its_model(tiny_folder, tmp_path, monkeypatch):
    """A rerun over saved results (a notebook run again) reads them without loading the model."""
    import editkit.runs

    values = grid_values(tiny_folder, tmp_path / "out")
    values.update(models=[tiny_folder], methods=["ft"], editor_overrides={"ft": values["editor_overrides"]["ft"]},
                  model_overrides={tiny_folder: {"editor_overrides": {"ft": {"layers": [1]}}}})
    first = run_study(StudyConfig.from_dict(values), progress=False)

    def refuse(cell):
        raise _Loaded(cell.model)

    monkeypatch.setattr(editkit.runs, "load_cell_model", refuse)
    again = run_study(StudyConfig.from_dict(values), progress=False)
    assert again.scores.equals(first.scores)
    with pytest.raises(_Loaded):  # one more checkpoint: the cell is not done, so its model is needed
        run_study(StudyConfig.from_dict({**values, "n_edits": 3, "checkpoints": [0, 2, 3]}), progress=False)

"""Offline tests of the CounterFact and zsRE loaders (packaged data, temporary files, a fake Hub)."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import sys
import types
from pathlib import Path

import pytest

from editkit import resources
from editkit.datasets import (
    data_checksums,
    edit_dataset,
    list_edit_datasets,
    load_counterfact,
    load_edit_requests,
    load_zsre,
)
from editkit.record_formats import from_rome
from editkit.types import EditRequest, InvalidRequestError

ROME_RECORD = {
    "case_id": 0,
    "pararel_idx": 2796,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "relation_id": "P103",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
        "subject": "Danielle Darrieux",
    },
    "paraphrase_prompts": [
        "Shayna does this and Yossel goes still and dies. Danielle Darrieux, a native",
        "An album was released. Danielle Darrieux is a native speaker of",
    ],
    "neighborhood_prompts": ["The mother tongue of Léon Blum is", "Michel Rocard is a native speaker of"],
    "attribute_prompts": ["J.\u00a0R.\u00a0R. Tolkien is a native speaker of"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}

EASYEDIT_RECORD = {
    "case_id": 7,
    "prompt": "The mother tongue of Danielle Darrieux is",
    "target_new": "English",
    "subject": "Danielle Darrieux",
    "ground_truth": "French",
    "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
    "locality_prompt": "Michel Rocard is a native speaker of",
    "locality_ground_truth": "French",
}


def _ids(requests: list[EditRequest]) -> list[object]:
    return [r.case_id for r in requests]


def _write_json(path: Path, records: list[object]) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- packaged CounterFact


@pytest.mark.parametrize(("split", "count"), [("edit", 10000), ("train", 10000), ("val", 1919)])
def test_counterfact_split_counts(split: str, count: int) -> None:
    assert len(load_counterfact(split)) == count


def test_counterfact_splits_partition_case_ids() -> None:
    ids = [i for split in ("edit", "train", "val") for i in _ids(load_counterfact(split))]
    assert sorted(ids) == list(range(21919))


def test_counterfact_first_record() -> None:
    (request,) = load_counterfact("edit", n=1)
    assert request == EditRequest(
        prompt="The mother tongue of Danielle Darrieux is",
        subject="Danielle Darrieux",
        target_new="English",
        target_true="French",
        rephrase_prompts=("Where Danielle Darrieux is from, people speak the language of",),
        locality_prompts=("Michel Rocard is a native speaker of",),
        locality_answers=("French",),
        case_id=0,
    )


def test_unknown_split_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="edit, train, val"):
        load_counterfact("test")
    with pytest.raises(ValueError, match="eval, train"):
        load_zsre("edit")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="n must be"):
        load_counterfact(n=-1)
    with pytest.raises(ValueError, match="on_invalid"):
        load_counterfact(n=1, on_invalid="ignore")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        load_counterfact(source="/nonexistent/counterfact.json")


# ----------------------------------------------------------------------------- n and shuffling


def test_prefix_is_file_order() -> None:
    full = load_counterfact("val")
    assert load_counterfact("val", n=25) == full[:25]
    assert _ids(load_counterfact("val", n=0)) == []
    assert len(load_counterfact("val", n=50_000)) == 1919


def test_shuffle_is_seeded_and_prefix_after_shuffle() -> None:
    first = _ids(load_counterfact("val", shuffle_seed=1))
    assert first == _ids(load_counterfact("val", shuffle_seed=1))
    assert first != _ids(load_counterfact("val", shuffle_seed=2))
    assert sorted(first) == sorted(_ids(load_counterfact("val")))
    assert first != _ids(load_counterfact("val"))
    assert _ids(load_counterfact("val", n=10, shuffle_seed=1)) == first[:10]


# ----------------------------------------------------------------------------- local files and the Hub


def test_rome_format_file(tmp_path: Path) -> None:
    second = copy.deepcopy(ROME_RECORD)
    second["case_id"] = 1
    second["requested_rewrite"]["subject"] = "Edwin of Northumbria"
    path = _write_json(tmp_path / "counterfact.json", [ROME_RECORD, second])
    requests = load_counterfact(source=path)
    assert _ids(requests) == [0, 1]
    request = requests[0]
    assert request.prompt == "The mother tongue of Danielle Darrieux is"
    assert (request.target_new, request.target_true) == ("English", "French")
    assert request.rephrase_prompts == tuple(ROME_RECORD["paraphrase_prompts"])
    assert request.locality_prompts == tuple(ROME_RECORD["neighborhood_prompts"])
    assert request.locality_answers == ("French", "French")
    assert request.metadata["relation_id"] == "P103"
    assert request.metadata["attribute_prompts"] == tuple(ROME_RECORD["attribute_prompts"])
    assert request.metadata["generation_prompts"] == tuple(ROME_RECORD["generation_prompts"])
    assert requests[1].prompt == "The mother tongue of Edwin of Northumbria is"


def test_json_lines_and_easyedit_file(tmp_path: Path) -> None:
    rome = tmp_path / "counterfact.jsonl"
    rome.write_text(json.dumps(ROME_RECORD) + "\n\n" + json.dumps(ROME_RECORD) + "\n", encoding="utf-8")
    assert len(load_counterfact(source=rome)) == 2
    easy = _write_json(tmp_path / "easy.json", [EASYEDIT_RECORD])
    (request,) = load_counterfact(source=str(easy))
    assert (request.case_id, request.target_true, request.locality_answers) == (7, "French", ("French",))


def test_hub_mapping_of_an_in_memory_record() -> None:
    request = from_rome(copy.deepcopy(ROME_RECORD), 0)
    assert request.prompt == "The mother tongue of Danielle Darrieux is"
    assert request.subject == "Danielle Darrieux"
    assert request.metadata["target_new_id"] == "Q1860"
    assert request.prompt_template == ROME_RECORD["requested_rewrite"]["prompt"]


def test_hub_source_goes_through_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def load_dataset(path: str, split: str, revision: str | None = None) -> list[dict]:
        calls.append((path, split, revision))
        return [copy.deepcopy(ROME_RECORD)]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    (request,) = load_counterfact("test", source="hf:azhx/counterfact@abc123")
    assert calls == [("azhx/counterfact", "test", "abc123")]
    assert request.target_new == "English"
    assert data_checksums("counterfact", "test", "hf:azhx/counterfact@abc123") == {"hf:azhx/counterfact": "abc123"}
    assert data_checksums("counterfact", "train", "hf:azhx/counterfact") == {"hf:azhx/counterfact": "unpinned"}


# ----------------------------------------------------------------------------- malformed records


def _rome(**changes: object) -> dict:
    record = copy.deepcopy(ROME_RECORD)
    record["case_id"] = 42
    for path, value in changes.items():
        *parents, key = path.split("__")
        target = record
        for parent in parents:
            target = target[parent]
        if value is None:
            del target[key]
        else:
            target[key] = value
    return record


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"requested_rewrite__subject": None}, "missing key 'requested_rewrite.subject'"),
        ({"requested_rewrite__target_new": None}, "missing key 'requested_rewrite.target_new.str'"),
        ({"requested_rewrite__target_new__str": 3}, "'requested_rewrite.target_new.str' must be a string"),
        ({"requested_rewrite__target_new__str": " "}, "'requested_rewrite.target_new.str' is an empty target"),
        ({"requested_rewrite__prompt": "The mother tongue of {x} is"}, "'requested_rewrite.prompt' is not a"),
        ({"requested_rewrite__prompt": "The mother tongue is"}, "does not occur verbatim"),
        ({"requested_rewrite__target_true": "French"}, "'requested_rewrite.target_true' must be an object"),
        ({"paraphrase_prompts": [1, 2]}, "'paraphrase_prompts' must be a string or a list of strings"),
    ],
)
def test_malformed_record_names_record_and_field(tmp_path: Path, changes: dict, field: str) -> None:
    path = _write_json(tmp_path / "cf.json", [ROME_RECORD, ROME_RECORD, _rome(**changes)])
    with pytest.raises(InvalidRequestError) as info:
        load_counterfact(source=path)
    message = str(info.value)
    assert "record 2 (case_id 42)" in message
    assert field in message
    assert str(path) in message


def test_malformed_easyedit_and_non_object(tmp_path: Path) -> None:
    bad = dict(EASYEDIT_RECORD, subject="Michel Rocard")
    path = _write_json(tmp_path / "easy.json", [EASYEDIT_RECORD, bad])
    with pytest.raises(InvalidRequestError, match=r"record 1 \(case_id 7\).*'Michel Rocard' does not occur"):
        load_counterfact(source=path)
    missing = {k: v for k, v in EASYEDIT_RECORD.items() if k != "target_new"}
    with pytest.raises(InvalidRequestError, match="record 0 .*missing key 'target_new'"):
        load_counterfact(source=_write_json(tmp_path / "m.json", [missing]))
    with pytest.raises(InvalidRequestError, match="record 1 .*expected a JSON object"):
        load_counterfact(source=_write_json(tmp_path / "s.json", [EASYEDIT_RECORD, "oops"]))


def test_skip_mode_logs_count_and_ids(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = [_rome(requested_rewrite__subject=None) for _ in range(7)]
    for i, record in enumerate(bad):
        record["case_id"] = 100 + i
    path = _write_json(tmp_path / "cf.json", [ROME_RECORD, *bad, ROME_RECORD])
    with caplog.at_level(logging.WARNING, logger="editkit.datasets"):
        requests = load_counterfact(source=path, on_invalid="skip")
    assert len(requests) == 2
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "skipped 7 invalid record(s)" in warning.getMessage()
    assert "record 1 (case_id 100)" in warning.getMessage()
    assert "case_id 106" not in warning.getMessage()


def test_bad_record_beyond_prefix_is_not_read(tmp_path: Path) -> None:
    path = _write_json(tmp_path / "cf.json", [ROME_RECORD, _rome(requested_rewrite__subject=None)])
    assert len(load_counterfact(source=path, n=1)) == 1


# ----------------------------------------------------------------------------- zsRE


def test_zsre_counts_and_invalid_records() -> None:
    for split, bad in (("eval", [54, 103]), ("train", [534, 723])):
        requests = load_zsre(split, on_invalid="skip")
        assert len(requests) == 998
        assert sorted(set(range(1000)) - set(_ids(requests))) == bad
    with pytest.raises(InvalidRequestError, match=r"record 54 \(case_id 54\): field 'alt' is an empty target"):
        load_zsre("eval")
    assert len(load_zsre("eval", n=54)) == 54


def test_zsre_mapping_of_first_record() -> None:
    (request,) = load_zsre("eval", n=1)
    assert request.prompt == "What university did Watts Humphrey attend?"
    assert request.subject == "Watts Humphrey"
    assert (request.target_new, request.target_true) == ("University of Michigan", "Illinois Institute of Technology")
    assert request.rephrase_prompts == ("What university did Watts Humphrey take part in?",)
    assert request.locality_prompts == ("nq question: who played desmond doss father in hacksaw ridge",)
    assert request.locality_answers == ("Hugo Weaving",)
    assert request.case_id == 0
    assert request.metadata["pred"] == "Trinity College"
    assert request.metadata["answers"] == ("Illinois Institute of Technology",)
    assert request.metadata["cond"].startswith("Trinity College >> University of Michigan")


def test_zsre_leading_space_in_alt_is_stripped() -> None:
    raw = json.loads(resources.read_text("zsre/zsre_mend_eval.first1000.json"))
    assert raw[50]["alt"] == " species"
    by_id = {r.case_id: r for r in load_zsre("eval", n=60, on_invalid="skip")}
    assert by_id[50].target_new == "species"
    assert ">>  species" in by_id[50].metadata["cond"]  # the raw value stays recoverable
    assert sum(r["alt"] != r["alt"].strip() for r in raw) == 19


def test_zsre_local_file_and_shuffle(tmp_path: Path) -> None:
    raw = json.loads(resources.read_text("zsre/zsre_mend_train-1k.json"))[:20]
    path = _write_json(tmp_path / "zsre.json", raw)
    assert load_zsre(source=path) == load_zsre("train", n=20)
    shuffled = _ids(load_zsre(source=path, shuffle_seed=0))
    assert shuffled != list(range(20)) and sorted(shuffled) == list(range(20))
    with pytest.raises(InvalidRequestError, match="record 0 .*'answers' must be a non-empty list"):
        load_zsre(source=_write_json(tmp_path / "bad.json", [dict(raw[0], answers=[])]))


# ----------------------------------------------------------------------------- checksums


def test_data_checksums(tmp_path: Path) -> None:
    rel = "counterfact/easyedit_format/counterfact-val.json"
    assert data_checksums("counterfact", "val") == {rel: resources.checksum(rel)}
    assert data_checksums("zsre", "train") == {"zsre/zsre_mend_train-1k.json": resources.checksum(
        "zsre/zsre_mend_train-1k.json")}
    path = _write_json(tmp_path / "cf.json", [ROME_RECORD])
    assert data_checksums("counterfact", "edit", path) == {
        str(path.resolve()): hashlib.sha256(path.read_bytes()).hexdigest()
    }
    with pytest.raises(ValueError, match="known: counterfact, zsre"):
        data_checksums("mquake", "edit")


# ----------------------------------------------------------------------------- registry


def test_registry_lists_the_packaged_datasets_and_their_splits() -> None:
    assert list_edit_datasets() == ["counterfact", "zsre"]
    assert edit_dataset("counterfact").splits == ("edit", "train", "val")
    assert edit_dataset("zsre").splits == ("eval", "train")
    assert [edit_dataset(name).eval_split for name in list_edit_datasets()] == ["edit", "eval"]


def test_unknown_edit_dataset_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown edit dataset 'mquake' \(known: counterfact, zsre\)"):
        edit_dataset("mquake")
    with pytest.raises(ValueError, match=r"did you mean 'counterfact'\? \(known: counterfact, zsre\)"):
        load_edit_requests("counterfakt", "edit", 3)
    with pytest.raises(ValueError, match="edit, train, val"):
        load_edit_requests("counterfact", "eval", 3)


def test_load_edit_requests_equals_the_dataset_loader() -> None:
    assert load_edit_requests("counterfact", "edit", 3) == load_counterfact("edit", 3)
    assert load_edit_requests("zsre", "eval", 3) == load_zsre("eval", 3)
    assert load_edit_requests("counterfact", "val", 4, shuffle_seed=7) == load_counterfact("val", 4, shuffle_seed=7)


def test_load_edit_requests_skips_invalid_records_when_asked(caplog: pytest.LogCaptureFixture) -> None:
    """Packaged zsRE eval records 54 and 103 have an empty target: by default that is an error naming it."""
    with pytest.raises(InvalidRequestError, match="54"):
        load_edit_requests("zsre", "eval", 110)
    with caplog.at_level(logging.WARNING, logger="editkit.datasets"):
        requests = load_edit_requests("zsre", "eval", 110, on_invalid="skip")
    assert len(requests) == 110 and {54, 103}.isdisjoint(r.case_id for r in requests)
    assert "skipped 2 invalid record(s)" in caplog.text

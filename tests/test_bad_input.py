"""Every bad input gets a clear error that says what is wrong and where."""

from __future__ import annotations

import pytest

import editkit
from editkit.adapters import UnsupportedModelError
from editkit.benchmarks import UnknownTaskError, evaluate
from editkit.config import UnknownParameterError
from editkit.editors import UnknownEditorError
from editkit.models import ModelNotAvailableError
from editkit.runs import StudyConfig
from editkit.types import EditRequest, InvalidRequestError


def test_unknown_model_type(tmp_path):
    import transformers

    config = transformers.BloomConfig(n_layer=1, hidden_size=16, n_head=2, vocab_size=64)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="'bloom' is not supported; supported types: .*llama"):
        editkit.load_model(str(tmp_path))


def test_unreachable_hub_names_the_offline_catalog(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError, match="smollm2-135m-instruct"):
        editkit.load_model("editkit-test/no-such-model")


def test_unknown_key_in_hyperparameter_yaml(make_tiny, tmp_path):
    path = tmp_path / "rome.yaml"
    path.write_text("layers: [1]\nv_lrr: 0.1\n")
    with pytest.raises(UnknownParameterError, match=r"unknown key 'v_lrr' in .*rome.yaml; did you mean 'v_lr'"):
        editkit.get_editor("rome", make_tiny("llama"), config_file=path)


def test_unknown_hyperparameter_override(make_tiny):
    with pytest.raises(UnknownParameterError, match="clamp_norm_factor"):
        editkit.get_editor("rome", make_tiny("llama"), clamp_norm=4)


def test_bad_hyperparameter_value(make_tiny):
    with pytest.raises(ValueError, match="v_num_grad_steps"):
        editkit.get_editor("rome", make_tiny("llama"), layers=[1], v_num_grad_steps="many")


def test_unknown_key_in_parameters_yaml(tmp_path):
    path = tmp_path / "demo.yaml"
    path.write_text("n_edits: 3\nn_edit: 4\n")
    with pytest.raises(UnknownParameterError, match=r"unknown key 'n_edit' in .*demo.yaml; did you mean 'n_edits'"):
        StudyConfig.from_yaml(path)


def test_unknown_editor():
    with pytest.raises(UnknownEditorError, match="unknown editor 'rom'.*did you mean rome"):
        editkit.get_editor("rom", None)


def test_subject_missing_from_prompt():
    with pytest.raises(InvalidRequestError, match="subject 'Paris' does not occur verbatim"):
        EditRequest("The Eiffel Tower is in", "Paris", "Rome", case_id=7)


@pytest.mark.parametrize("field", ["target_new", "prompt", "subject"])
def test_empty_fields(field):
    values = {"prompt": "The Eiffel Tower is in", "subject": "The Eiffel Tower", "target_new": "Rome"}
    values[field] = "  "
    with pytest.raises(InvalidRequestError, match=f"request 3: field '{field}' is empty"):
        EditRequest(**values, case_id=3)


def test_unknown_task(make_tiny):
    with pytest.raises(UnknownTaskError, match="mmlu_cloze"):
        evaluate(make_tiny("llama"), ["mmlu_clozed"], limit=1)


def test_edit_needs_requests(make_tiny):
    editor = editkit.get_editor("rome", make_tiny("llama"), layers=[1])
    with pytest.raises(ValueError, match="at least one"):
        editor.edit([])
    with pytest.raises(TypeError, match="EditRequest"):
        editor.edit([{"prompt": "x"}])

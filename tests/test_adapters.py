"""Every adapter row resolves on a tiny random model of its architecture."""

from __future__ import annotations

import pytest
import torch

from editkit.adapters import ADAPTERS, UnsupportedModelError, get_adapter
from editkit.hooks import capture

from .conftest import TINY_CONFIGS


def test_every_adapter_row_has_a_tiny_model():
    assert set(TINY_CONFIGS) == set(ADAPTERS)


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_adapter_roles_and_orientation(make_tiny, model_type):
    lm = make_tiny(model_type)
    adapter = lm.adapter
    assert lm.model.config.model_type == model_type
    assert adapter.n_layers(lm.model) == 3
    d_model = lm.model.get_input_embeddings().weight.shape[1]
    ids = lm.tokenizer("The Eiffel Tower is in", return_tensors="pt").input_ids
    paths = [adapter.path("mlp_out", 1), adapter.path("mlp", 1)]
    with capture(lm.model, paths) as store:
        lm.model(ids)
    key, out = store[adapter.path("mlp_out", 1)]
    w = adapter.as_out_in(adapter.weight(lm.model, "mlp_out", 1))
    # out x in: the MLP output projection maps d_mlp keys to d_model values.
    assert w.shape == (d_model, key.shape[-1])
    bias = adapter.module(lm.model, "mlp_out", 1).bias
    expected = key @ w.T + (bias if bias is not None else 0)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # The MLP module's output is the output projection's output (what ROME's v* targets).
    torch.testing.assert_close(store[adapter.path("mlp", 1)][1], out)


def test_unknown_model_type_lists_supported():
    with pytest.raises(UnsupportedModelError, match="supported types: .*gpt2.*llama"):
        get_adapter("mamba")


def test_missing_role_is_reported(make_tiny):
    lm = make_tiny("llama")
    broken = ADAPTERS["gpt2"]
    with pytest.raises(UnsupportedModelError, match="not found"):
        broken.validate(lm.model)


def test_public_names_resolve_lazily():
    import importlib
    import subprocess
    import sys

    import editkit

    assert set(editkit.__all__) == set(editkit._LAZY)
    for name in editkit.__all__:
        module, attr = editkit._LAZY[name].split(":")
        value = getattr(editkit, name)
        assert value is getattr(importlib.import_module(module), attr), name
        # Capitalised names are classes, the others functions.
        assert isinstance(value, type) if name[0].isupper() else callable(value) and not isinstance(value, type), name
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        editkit.no_such_name  # noqa: B018
    # `import editkit` alone must not import torch (cheap import, nothing read at import time),
    # and no public name is bound before it is first used.
    code = "import sys, editkit; assert 'torch' not in sys.modules; assert not set(editkit._LAZY) & set(vars(editkit))"
    subprocess.run([sys.executable, "-c", code], check=True)

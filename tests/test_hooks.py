"""Hooks come off: only editkit.hooks registers them, and no edit leaves one behind, even when it fails."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import editkit
from editkit.editors import resolve_params
from editkit.editors.mend import MEND, MENDNet, MENDTrainable, _Edit, _locality_text
from editkit.hooks import get_module
from editkit.types import EditRequest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REQUEST = EditRequest("The Eiffel Tower is located in the city of", "The Eiffel Tower", "Rio de Janeiro", "Paris",
                      rephrase_prompts=("Where is the Eiffel Tower? It is in",), case_id="t")
OTHER = EditRequest("Danielle Darrieux's mother tongue is", "Danielle Darrieux", "English", "French", case_id="o")
PACKAGE = Path(editkit.__file__).parent


class Boom(RuntimeError):
    """Raised by the test's failing module."""


def hooked(model: torch.nn.Module, kinds: tuple[str, ...] = ("_forward_hooks", "_forward_pre_hooks")) -> list[str]:
    """Names of the modules that hold any hook of ``kinds`` (forward and forward-pre by default)."""
    return [name for name, module in model.named_modules() if any(getattr(module, kind) for kind in kinds)]


def fail_while_hooked(lm, kind: str) -> None:
    """Make the unembedding raise when it is called while a hook of ``kind`` is registered in the model."""
    module = get_module(lm.model, lm.adapter.path("unembed"))
    original = module.forward

    def forward(*args, **kwargs):
        if hooked(lm.model, (kind,)):
            raise Boom(f"a forward pass failed while {kind} were on")
        return original(*args, **kwargs)

    module.forward = forward  # an instance attribute: nn.Module.__call__ runs it


def make_editor(lm, name: str):
    if name == "mend":
        params = resolve_params("mend", lm, rank=8, edit_lr=1e-2)
        return MEND(lm, params, net=MENDNet.for_model(lm, params))
    options = {
        "ft": dict(layers=[1], num_steps=2),
        "kn": dict(steps=2, batch_size=64),
        "grace": dict(layers=[1], role="mlp_out", eps=0.01, n_iter=3),
        "rome": dict(layers=[1], v_num_grad_steps=2, context_template_length_params=[[5, 1]]),
    }[name]
    return editkit.get_editor(name, lm, **options)


def test_only_the_hooks_module_registers_hooks():
    pattern = re.compile(r"register_(forward|forward_pre|full_backward|full_backward_pre|module_forward)\w*_hook\(")
    offenders = [f"{path.relative_to(PACKAGE)}:{number}"
                 for path in sorted(PACKAGE.rglob("*.py")) if path.name != "hooks.py"
                 for number, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, f"register hooks through editkit.hooks, not by hand: {offenders}"


# The kind of hook each editor holds while it runs the model (the failure hits a pass that has one).
KINDS = {"ft": "_forward_pre_hooks", "mend": "_forward_pre_hooks", "kn": "_forward_pre_hooks",
         "rome": "_forward_hooks", "grace": "_forward_hooks"}


@pytest.mark.parametrize("name", list(KINDS))
def test_no_hook_is_left_after_an_edit_or_a_failed_one(make_tiny, name):
    lm = make_tiny("llama")
    assert not hooked(lm.model)
    editor = make_editor(lm, name)
    handle = editor.edit([REQUEST, OTHER])
    # GRACE's adaptor stays on its module while the codebook has entries, and only there.
    assert hooked(lm.model) == ([editor.module_path] if name == "grace" else [])
    handle.restore()
    assert not hooked(lm.model)

    fail_while_hooked(lm, KINDS[name])
    with pytest.raises(Boom):
        make_editor(lm, name).edit([REQUEST, OTHER])
    assert not hooked(lm.model), f"{name} left hooks behind after a failed edit"


def test_no_hook_is_left_by_a_failed_mend_training_loss(make_tiny):
    lm = make_tiny("gpt2")
    trainable = MENDTrainable(lm, resolve_params("mend", lm, rank=8, accumulate_bs=1, batch_size=2),
                              [REQUEST, OTHER, REQUEST])
    edit = _Edit([REQUEST, OTHER], [_locality_text(REQUEST, OTHER), _locality_text(OTHER, REQUEST)])
    trainable.loss([edit])
    assert not hooked(lm.model)
    fail_while_hooked(lm, "_forward_hooks")
    with pytest.raises(Boom):
        trainable.loss([edit])
    assert not hooked(lm.model)

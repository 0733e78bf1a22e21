"""Half-precision models (the GPU path, checked on the CPU) and the engine's out-of-memory fallback.

A bfloat16 or float16 model is edited by every editor with its maths in float32
or float64, and the edited weights are stored back in the model's dtype. In
float16 this is what keeps ROME, MEMIT and FT finite: Adam's eps (1e-8) and
second moments underflow there, and before the edit maths was lifted to float32
every one of their edits on a tiny float16 model ended in non-finite weights.
"""

from __future__ import annotations

import pytest
import torch

import editkit
from editkit.benchmarks import Engine
from editkit.datasets import load_counterfact
from editkit.editing import EditHandle
from tests.helpers import snapshot, target_logprob
from tests.test_editor_contract import FAST, RISES_ON_TINY, build, probe_logits

pytestmark = pytest.mark.usefixtures("session_cache", "one_torch_thread")

EDITORS = editkit.list_editors()
HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# Editors that change weights (the others act through hooks or routing and keep every weight).
WEIGHT_EDITORS = set(EDITORS) - {"grace", "serac", "ike", "wise"}


@pytest.fixture(scope="module")
def request_0():
    return load_counterfact("edit", 1)[0]


@pytest.mark.parametrize("dtype", list(HALF))
@pytest.mark.parametrize("name", EDITORS)
def test_half_precision_edit_keeps_the_dtype_and_restores(make_tiny, request_0, name, dtype):
    lm = make_tiny("llama")
    lm.model.to(HALF[dtype])
    weights, logits = snapshot(lm), probe_logits(lm)
    before = target_logprob(lm, request_0.prompt, request_0.target_new)
    handle = build(name, lm, FAST[name]).edit(request_0)
    after = target_logprob(lm, request_0.prompt, request_0.target_new)
    state = lm.model.state_dict()
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {HALF[dtype]}
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    changed = [k for k in state if not torch.equal(state[k], weights[k])]
    if name in WEIGHT_EDITORS:
        assert changed, f"{name} changed no weight in {dtype}"
    if name in RISES_ON_TINY:
        assert after > before, f"{name} in {dtype}: log P(new) {before:.4f} -> {after:.4f}"
    handle.restore()
    assert all(torch.equal(v, weights[k]) for k, v in lm.model.state_dict().items())
    assert torch.equal(probe_logits(lm), logits)


def test_an_update_is_rounded_once_to_the_parameters_dtype(make_tiny):
    """W + Δ is formed in float32 and rounded once; a float32 model gets exactly W + float32(Δ)."""
    lm = make_tiny("llama")
    path = "model.layers.1.mlp.down_proj.weight"
    editor = editkit.get_editor("ft", lm, **FAST["ft"])
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(lm.model.get_parameter(path).shape, generator=generator, dtype=torch.float64) * 1e-3
    start = lm.model.get_parameter(path).detach().clone()
    editor._update_weight(EditHandle(lm.model), path, delta)
    assert torch.equal(lm.model.get_parameter(path), start + delta.float())
    lm.model.to(torch.bfloat16)
    start = lm.model.get_parameter(path).detach().clone()
    editor._update_weight(EditHandle(lm.model), path, delta)
    once = (start.float() + delta.float()).to(torch.bfloat16)
    twice = start + delta.to(torch.bfloat16)  # the update rounded first, then the sum
    assert torch.equal(lm.model.get_parameter(path), once)
    assert not torch.equal(once, twice), "the test's Δ must be one that the second rounding changes"


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bfloat16 matmuls are emulated on this CPU (5x float32)")
def test_rome_edits_bfloat16_smollm2_on_the_gpu(request_0):
    """ROME on the real model in bfloat16 on a GPU: the target rises and the model stays bfloat16.

    Part of scripts/gpu_check.sh; on the CPU the tiny-model tests above cover the same code.
    """
    from editkit.models import load_model

    lm = load_model("smollm2-135m-instruct", dtype="bfloat16", device="auto")
    weights = snapshot(lm)
    before = target_logprob(lm, request_0.prompt, request_0.target_new)
    handle = build("rome", lm, {"v_num_grad_steps": 10, "context_template_length_params": [[5, 2]]}).edit(request_0)
    after = target_logprob(lm, request_0.prompt, request_0.target_new)
    assert after > before + 2.0, f"log P(new) {before:.3f} -> {after:.3f}"
    assert {v.dtype for v in lm.model.state_dict().values() if v.is_floating_point()} == {torch.bfloat16}
    handle.restore()
    assert all(torch.equal(v, weights[k]) for k, v in lm.model.state_dict().items())


def _oom_above(engine: Engine, rows: int, monkeypatch) -> list[int]:
    """Make ``engine.forward`` raise OutOfMemoryError for batches of more than ``rows``; returns the sizes seen."""
    seen: list[int] = []
    forward = engine.forward

    def limited(input_ids, *args, **kwargs):
        seen.append(input_ids.shape[0])
        if input_ids.shape[0] > rows:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(input_ids, *args, **kwargs)

    monkeypatch.setattr(engine, "forward", limited)
    return seen


def test_auto_batch_halves_on_out_of_memory(make_tiny, monkeypatch):
    lm = make_tiny("llama")
    requests = [(f"Question {i}: the answer is", f" {w}") for i, w in enumerate(["red", "blue green", "yes"] * 4)]
    expected = Engine(lm, batch_size=1, progress=False).loglikelihood(requests)
    engine = Engine(lm, batch_size="auto", progress=False, max_batch_size=16)
    seen = _oom_above(engine, 2, monkeypatch)
    got = engine.loglikelihood(requests)
    assert max(seen) > 2, "the first batch should have been larger than the simulated limit"
    assert engine.max_batch_size <= 2
    assert [g for _, g in got] == [g for _, g in expected]
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in expected], abs=1e-4)
    fixed = Engine(lm, batch_size=8, progress=False)
    _oom_above(fixed, 2, monkeypatch)
    with pytest.raises(torch.OutOfMemoryError):
        fixed.loglikelihood(requests)


def test_a_study_accepts_automatic_batches_and_a_half_precision_model(make_tiny, tmp_path):
    """``batch_size: auto`` (the GPU setting) gives the same items as a fixed batch, on a bfloat16 model."""
    from editkit.grid import StudyConfig
    from editkit.runs import run_study
    from tests.test_integrity import tiny_config

    with pytest.raises(ValueError, match="batch_size"):
        StudyConfig.from_dict({"model": "tiny", "batch_size": 0})
    with pytest.raises(ValueError, match="batch_size"):
        StudyConfig.from_dict({"model": "tiny", "batch_size": "large"})
    lm = make_tiny("llama")
    lm.model.to(torch.bfloat16)
    results = {size: run_study(tiny_config(tmp_path / str(size), batch_size=size, n_edits=1, checkpoints=[0, 1],
                                           heldout_chunks=2), progress=False, lm=lm) for size in ("auto", 1)}
    auto, fixed = (results[size].items.sort_values(["n_edits", "task", "item_id"]) for size in ("auto", 1))
    assert len(auto) == len(fixed) > 0
    assert list(auto["prediction"]) == list(fixed["prediction"])
    ppl = {size: r.health.query("metric == 'heldout_ppl'").sort_values("n_edits")["value"].to_numpy()
           for size, r in results.items()}
    assert len(ppl["auto"]) == 2 and ppl["auto"] == pytest.approx(ppl[1], rel=2e-2)
    assert {v.dtype for v in lm.model.state_dict().values() if v.is_floating_point()} == {torch.bfloat16}

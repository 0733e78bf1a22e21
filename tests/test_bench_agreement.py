"""editkit's engine agrees with lm-evaluation-harness's HFLM on the same requests (slow; needs lm-eval).

A small sample of what ``scripts/bench_eval.py`` measures at full size: the
same MMLU and GSM8K requests through editkit's :class:`~editkit.benchmarks.Engine`
and lm-eval's ``HFLM`` wrapping the same in-memory SmolLM2, in one process.
The MMLU items are the first of one subject, so editkit's shared few-shot
prefix path is the one compared.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from editkit.benchmarks import Engine

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_eval.py"


@pytest.fixture(scope="module")
def bench_eval():
    spec = importlib.util.spec_from_file_location("bench_eval", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    pytest.importorskip("lm_eval")
    return module


@pytest.fixture(scope="module")
def engines(bench_eval, smollm2):
    return Engine(smollm2, batch_size=4, progress=False), bench_eval.lm_eval_hflm(smollm2, batch_size=4)


def test_mmlu_loglikelihoods_agree(bench_eval, engines):
    task = bench_eval.task_requests("mmlu", 20, selection="first", num_fewshot=2)
    summary = bench_eval.compare(*engines, task, bare=False).summary
    assert summary["items"] == 20 and summary["requests"] == 80
    assert summary["answer_agreement"] == 1.0
    assert summary["max_abs_dlogprob"] < 1e-3
    assert summary["greedy_flag_agreement"] == 1.0
    assert summary["acc_editkit"] == summary["acc_lm_eval"]


def test_gsm8k_generations_agree(bench_eval, engines):
    task = bench_eval.task_requests("gsm8k", 5, max_new_tokens=12, num_fewshot=2)
    result = bench_eval.compare(*engines, task, bare=False)
    assert result.summary["identical_outputs"] == 1.0, result.items[["output_editkit", "output_lm_eval"]]
    assert result.summary["answer_agreement"] == 1.0
    assert result.items["output_editkit"].str.len().gt(0).all()

"""The health alarm: held-out perplexity, weight statistics, tidy rows, thresholds, and the
packaged held-out text (its digest and its disjointness from the edit data)."""

from __future__ import annotations

import hashlib
import lzma
import math
import re
import shutil
import sys

import pytest
import torch

from editkit import health, heldout, resources
from editkit.datasets import edit_dataset, list_edit_datasets, load_edit_requests
from editkit.types import EditRequest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = ["The cat sat on the mat.",
         "A much longer sentence about the weather in the mountains, which was cold and wet."]


def _hand_nll(lm, text: str) -> tuple[float, int]:
    """Total NLL of ``text`` after a BOS token, from one unpadded forward pass."""
    ids = [lm.tokenizer.bos_token_id] + lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([ids])).logits[0].double()
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    return -sum(logprobs[i, ids[i + 1]].item() for i in range(len(ids) - 1)), len(ids) - 1


def test_perplexity_is_exp_of_mean_token_nll_and_padding_never_counts(make_tiny):
    lm = make_tiny("llama")
    nlls, counts = zip(*(_hand_nll(lm, text) for text in TEXTS), strict=True)
    assert counts[0] < counts[1]  # the first text is padded in a batch of two
    result = health.score_texts(lm, TEXTS, batch_size=2)
    assert result.text_tokens == counts and result.n_tokens == sum(counts)
    assert result.perplexity == pytest.approx(math.exp(sum(nlls) / sum(counts)), rel=1e-5)
    assert result.text_nll == pytest.approx([n / c for n, c in zip(nlls, counts, strict=True)], rel=1e-5)
    assert result.finite and result.n_truncated == 0
    assert health.perplexity(lm, TEXTS, batch_size=1) == pytest.approx(result.perplexity, rel=1e-5)


def test_long_texts_are_truncated_and_counted(make_tiny):
    lm = make_tiny("gpt2")
    result = health.score_texts(lm, TEXTS, max_length=8)  # the first text is 7 tokens after BOS: not cut
    assert result.text_tokens == (7, 7) and result.n_truncated == 1
    with pytest.raises(ValueError):
        health.score_texts(lm, [])


def test_smollm2_heldout_perplexity_is_plausible_for_english(smollm2):
    result = health.score_texts(smollm2, health.heldout_texts(n_chunks=4))
    assert result.finite and result.n_truncated == 0 and result.n_tokens > 500
    assert 5 < result.perplexity < 200


def test_nan_weight_gives_infinite_perplexity_flagged_not_raised(make_tiny):
    lm = make_tiny("llama")
    reference = health.snapshot_parameters(lm)
    path = lm.adapter.weight_path("mlp_out", 0)
    with torch.no_grad():
        lm.model.get_parameter(path)[0, 0] = float("nan")
    report = health.measure_health(lm, TEXTS, reference, baseline_ppl=50.0)
    assert report.heldout.perplexity == math.inf and not report.heldout.finite
    rows = {row["metric"]: row["value"] for row in report.rows() if row["parameter"] is None}
    assert rows["heldout_nonfinite"] == 1.0 and rows["heldout_ppl"] == math.inf
    assert math.isnan(rows["max_rel_norm_growth"])  # a NaN weight is not hidden by the max
    assert math.isnan(rows["max_spectral_ratio"]) and rows["n_changed_parameters"] == 1
    reason = health.HealthAlarm(max_norm_growth=10.0).check(report.rows())
    assert reason is not None and "not finite" in reason and "norm growth of a changed parameter is nan" in reason


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])  # Linear and Conv1D layouts
def test_doubling_one_mlp_weight_doubles_its_norm_and_spectral_norm(make_tiny, model_type):
    lm = make_tiny(model_type)
    path = lm.adapter.weight_path("mlp_out", 1)
    reference = health.snapshot_parameters(lm)
    assert health.weight_health(lm, reference) == []  # unchanged model: nothing to report
    unchanged = health.weight_health(lm, reference, paths=[path])
    assert unchanged[0]["rel_norm_growth"] == 0.0 and unchanged[0]["spectral_ratio"] == pytest.approx(1.0)
    weight = lm.model.get_parameter(path)
    with torch.no_grad():
        weight.mul_(2)
    (row,) = health.weight_health(lm, reference)
    assert row["parameter"] == path
    assert row["rel_norm_growth"] == pytest.approx(1.0, abs=1e-6)
    assert row["spectral_ratio"] == pytest.approx(2.0, abs=1e-6)
    assert row["spectral_norm"] == pytest.approx(torch.linalg.matrix_norm(weight.double(), ord=2).item(), rel=1e-9)
    assert row["condition_number"] == pytest.approx(row["reference_condition_number"], rel=1e-9)
    assert row["condition_number"] == pytest.approx(torch.linalg.cond(weight.double()).item(), rel=1e-6)
    summary = {r["metric"]: r["value"] for r in health.health_rows(weights=[row]) if r["parameter"] is None}
    assert summary["n_changed_parameters"] == 1
    assert summary["max_rel_norm_growth"] == pytest.approx(1.0, abs=1e-6)
    assert summary["max_spectral_ratio"] == pytest.approx(2.0, abs=1e-6)


def test_vector_parameters_get_norm_growth_only(make_tiny):
    lm = make_tiny("llama")
    path = "model.norm.weight"
    reference = health.snapshot_parameters(lm, [path])
    with torch.no_grad():
        lm.model.get_parameter(path).add_(1.0)  # the RMSNorm weight starts at ones: ||dW|| = ||W0||
    (row,) = health.weight_health(lm, reference)
    assert row["rel_norm_growth"] == pytest.approx(1.0) and math.isnan(row["spectral_norm"])
    with pytest.raises(KeyError, match="no reference"):
        health.weight_health(lm, reference, paths=[lm.adapter.weight_path("mlp_out", 0)])


def _fake_heldout(ppl: float) -> health.PerplexityResult:
    return health.PerplexityResult(ppl, math.log(ppl) * 100, 100, (math.log(ppl),), (100,), 0, True)


def test_alarm_reports_a_crossed_threshold_and_stays_quiet_below():
    alarm = health.HealthAlarm(max_ppl_ratio=100.0)
    reason = alarm.check(health.health_rows(_fake_heldout(9.1e3), baseline_ppl=86.7))
    assert reason == "held-out perplexity 9.1e+03 is 105x the unedited 86.7 (alarm at 100x)"
    assert alarm.check(health.health_rows(_fake_heldout(120.0), baseline_ppl=86.7)) is None
    weights = [{"parameter": "w", "matrix": True, "rel_norm_growth": 0.5, "spectral_norm": 3.0, "spectral_ratio": 1.5,
                "condition_number": 40.0, "reference_condition_number": 20.0}]
    rows = health.health_rows(_fake_heldout(90.0), weights, baseline_ppl=86.7)
    assert health.HealthAlarm(max_norm_growth=0.6, max_spectral_ratio=2.0).check(rows) is None
    reason = health.HealthAlarm(max_norm_growth=0.25, max_condition_number=30.0).check(rows)
    assert "relative weight norm growth of a changed parameter is 0.5 (alarm at 0.25)" in reason
    assert "condition number of a changed parameter is 40 (alarm at 30)" in reason
    unchanged = health.health_rows(_fake_heldout(90.0), [], baseline_ppl=86.7)
    assert health.HealthAlarm(max_norm_growth=1e-9, max_condition_number=1.0).check(unchanged) is None


@pytest.mark.parametrize("threshold", [0, -1.0, float("nan"), float("inf"), True, "100"])
def test_alarm_rejects_a_threshold_that_is_not_positive(threshold):
    with pytest.raises(ValueError, match="positive"):
        health.HealthAlarm(max_ppl_ratio=threshold)
    with pytest.raises(ValueError, match="positive"):
        health.HealthAlarm(max_ppl_ratio=None, max_norm_growth=threshold)


def test_alarm_needs_the_rows_its_thresholds_read():
    with pytest.raises(ValueError, match="heldout_ppl_ratio"):
        health.HealthAlarm().check(health.health_rows(_fake_heldout(50.0)))  # no baseline given
    with pytest.raises(ValueError, match="baseline_ppl"):
        health.health_rows(_fake_heldout(50.0), baseline_ppl=0.0)


def test_heldout_texts_are_fixed_bounded_chunks_of_the_whole_text():
    paragraphs = health.heldout_paragraphs()
    chunks = health.chunk_paragraphs(paragraphs, 150)
    assert len(paragraphs) == 643 and len(chunks) > 300
    assert " ".join(chunks).split() == " ".join(paragraphs).split()  # every word, in order
    assert max(len(chunk.split()) for chunk in chunks) <= 150
    texts = health.heldout_texts()
    assert len(texts) == 32 and texts == health.heldout_texts()
    assert texts[0] == chunks[0] and texts[-1] == chunks[31 * len(chunks) // 32]
    assert "\n\n" in texts[0]  # paragraph breaks are kept inside a chunk
    with pytest.raises(ValueError, match="n_chunks"):
        health.heldout_texts(n_chunks=len(chunks) + 1)


def test_wikitext_source_names_the_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    with pytest.raises(ImportError, match="datasets"):
        health.heldout_texts(source="wikitext")
    with pytest.raises(ValueError, match="unknown held-out source"):
        health.heldout_paragraphs("wiki")


def test_no_edit_subject_or_prompt_occurs_in_the_heldout_text():
    text = "\n\n".join(health.heldout_paragraphs())
    locality = set()
    for name in list_edit_datasets():
        for split in edit_dataset(name).splits:
            overlap = heldout.edit_overlap(load_edit_requests(name, split, None, on_invalid="skip"), text)
            assert overlap.n_requests >= 998
            assert overlap.subjects == () and overlap.prompts == (), (name, split)
            locality.update(overlap.locality_prompts)
    # CounterFact case 18771's locality prompt is a two-word fragment; "Madonna" is a nickname in the novel.
    assert locality == {"Madonna, the"}


def test_edit_overlap_finds_what_is_there():
    request = EditRequest(prompt="The capital city of Examplestan is", subject="Examplestan",
                          target_new="Foo", rephrase_prompts=("Examplestan's capital is",))
    text = "In 1900 the capital city of Examplestan is moved. Examplestan's capital is big."
    overlap = heldout.edit_overlap([request], text, min_subject_length=11)
    assert overlap.subjects == ("Examplestan",)
    assert overlap.prompts == ("Examplestan's capital is",)  # the edit prompt's case differs
    assert heldout.edit_overlap([request], text).subjects == ()  # 11 characters < 12


def test_packaged_text_matches_the_readme_digest(tmp_path, monkeypatch):
    folder = resources.data_root() / "heldout"
    readme = (folder / "README.md").read_text()
    (digest,) = re.findall(r"sha256 \(uncompressed\) \| `([0-9a-f]{64})`", readme)
    data = lzma.decompress((folder / "botchan.txt.xz").read_bytes())
    assert hashlib.sha256(data).hexdigest() == digest == health.HELDOUT_SHA256
    assert (folder / "LICENSE").read_text().startswith("*** END OF THIS PROJECT GUTENBERG EBOOK BOTCHAN")
    copy = tmp_path / "data"
    shutil.copytree(folder, copy / "heldout")
    (copy / "heldout" / "botchan.txt.xz").write_bytes(lzma.compress(data.replace(b"Kiyo", b"Kiyo!", 1)))
    monkeypatch.setattr(heldout, "data_root", lambda: copy)
    with pytest.raises(resources.ChecksumError, match="heldout"):
        health.heldout_paragraphs()


def _result(nll_per_token: list[float], tokens: list[int]) -> health.PerplexityResult:
    total = sum(n * t for n, t in zip(nll_per_token, tokens))
    return health.PerplexityResult(math.exp(total / sum(tokens)), total, sum(tokens), tuple(nll_per_token),
                                   tuple(tokens), 0, True)


def test_heldout_interval_covers_the_value_and_pairs_with_the_baseline():
    base = _result([3.0, 4.0, 5.0, 3.5, 4.5, 2.5], [100, 80, 120, 90, 110, 100])
    low, high = health.heldout_interval(base)
    assert low < base.perplexity < high and high / low > 1.5, "texts of unequal difficulty give a wide interval"
    # Every text 0.1 nats harder: the paired ratio is exp(0.1) on every resample, however hard the texts.
    shifted = _result([v + 0.1 for v in base.text_nll], list(base.text_tokens))
    low, high = health.heldout_interval(shifted, base)
    assert low == pytest.approx(math.exp(0.1), rel=1e-12) and high == pytest.approx(math.exp(0.1), rel=1e-12)
    rows = {r["metric"]: r for r in health.health_rows(shifted, baseline_ppl=base)}
    assert rows["heldout_ppl_ratio"]["value"] == pytest.approx(math.exp(0.1))
    assert rows["heldout_ppl_ratio"]["ci_low"] == pytest.approx(math.exp(0.1))
    assert rows["heldout_ppl"]["ci_low"] < rows["heldout_ppl"]["value"] < rows["heldout_ppl"]["ci_high"]
    assert math.isnan(rows["max_rel_norm_growth"]["ci_low"]), "a single measurement has no interval"
    with pytest.raises(ValueError, match="other texts"):
        health.heldout_interval(_result([3.0], [10]), base)
    broken = _result([math.inf] * 6, list(base.text_tokens))
    assert all(math.isnan(v) for v in health.heldout_interval(broken, base))

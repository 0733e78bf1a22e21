"""A model's health during sequential editing: held-out perplexity and weight statistics.

Edit metrics say whether the facts went in; benchmarks say what the model can still do,
but are slow. This module measures two cheap signals at every checkpoint, for an alarm
that flags a run whose model has collapsed. Collapse papers use held-out perplexity as a
surrogate ("The Butterfly Effect of Model Editing", ACL 2024 Findings); collapse correlates
with norm growth of the edited weights (NAS, arXiv 2602.02543), and PRUNE (arXiv
2405.16821) bounds the edited matrix's condition number. See ``../shared/REFERENCES.md``.

* **held-out perplexity** on fixed natural prose that no edit touches: token-level
  ``exp(total NLL / predicted tokens)`` (:func:`score_texts`, :func:`perplexity`);
* **weight health** of every changed parameter relative to its unedited value
  (:func:`weight_health`): relative norm growth ``||W - W0||_F / ||W0||_F``, the spectral
  norm ``sigma_max(W)`` and its ratio to ``sigma_max(W0)``, and the condition number
  ``sigma_max / sigma_min``.

:func:`health_rows` turns both into tidy ``metric``/``value`` rows and :class:`HealthAlarm`
checks them against thresholds. The held-out prose and its provenance are in :mod:`editkit.heldout`; nothing is read at
import time.
"""


from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .heldout import HELDOUT_FILE, HELDOUT_SHA256, chunk_paragraphs, heldout_paragraphs, heldout_texts
from .hooks import get_parameter
from .tokens import encode_pair, pad_batch

if TYPE_CHECKING:
    from .models import LoadedModel

# The held-out text's names are re-exported: health.heldout_texts() is where users look.
__all__ = ["HELDOUT_FILE", "HELDOUT_SHA256", "heldout_paragraphs", "heldout_texts", "chunk_paragraphs",
           "PerplexityResult", "score_texts", "perplexity", "heldout_interval", "snapshot_parameters", "weight_health",
           "HealthReport", "measure_health", "health_rows", "HealthAlarm"]

log = logging.getLogger(__name__)

_WEIGHT_KEYS = ("rel_norm_growth", "spectral_norm", "spectral_ratio", "condition_number",
                "reference_condition_number")


@dataclass(frozen=True)
class PerplexityResult:
    """Token-level negative log-likelihood of a set of texts (:func:`score_texts`).

    Attributes:
        perplexity: ``exp(nll / n_tokens)``; ``inf`` when the model's outputs were not
            finite (or the mean NLL overflows ``exp``).
        nll: total NLL in nats over all predicted tokens (nan or inf when not finite).
        n_tokens: predicted tokens (padding never counts).
        text_nll: mean NLL per predicted token of each text, in input order.
        text_tokens: predicted tokens of each text.
        n_truncated: texts cut to ``max_length`` tokens.
        finite: every NLL was finite.
    """

    perplexity: float
    nll: float
    n_tokens: int
    text_nll: tuple[float, ...]
    text_tokens: tuple[int, ...]
    n_truncated: int
    finite: bool


def score_texts(lm: LoadedModel, texts: Sequence[str], *, max_length: int = 256,
                batch_size: int = 8) -> PerplexityResult:
    """Perplexity of ``lm`` on ``texts``, never raising on non-finite outputs.

    Each text is encoded as :func:`editkit.tokens.encode_pair` encodes a continuation of an
    empty context (lm-eval's rule): a start token (BOS, or EOS if there is none) followed by
    the text's tokens, so every token of the text is predicted, the first one from the start
    token alone. Sequences are cut to ``max_length`` tokens (start token included), right
    padded with an attention mask and run without gradients; padded positions are never
    scored. A memory editor's routing (SERAC, IKE) applies, as to any direct forward call
    (:mod:`editkit.routing`): a routed text is scored after its edit context, start token
    included in the routed text. The model is unchanged on return.

    Raises:
        ValueError: no texts, a non-positive ``max_length`` or ``batch_size``, or no text
            with a token to predict.
    """
    if not texts:
        raise ValueError("score_texts needs at least one text")
    if max_length < 2 or batch_size < 1:
        raise ValueError(f"max_length must be >= 2 and batch_size >= 1, got {max_length} and {batch_size}")
    sequences = []
    n_truncated = 0
    for text in texts:
        start, ids = encode_pair(lm.tokenizer, "", text)
        n_truncated += len(start) + len(ids) > max_length
        sequences.append((start + ids)[:max_length])
    if n_truncated:
        log.info("%d of %d held-out texts were cut to %d tokens", n_truncated, len(texts), max_length)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
    text_sums: list[float] = []
    text_tokens = [len(sequence) - 1 for sequence in sequences]
    if sum(text_tokens) == 0:
        raise ValueError("no text has a token to predict")
    with torch.no_grad():
        for at in range(0, len(sequences), batch_size):
            batch = sequences[at:at + batch_size]
            ids, mask = pad_batch(batch, pad)
            ids_t = torch.tensor(ids, device=lm.device)
            logits = lm.model(input_ids=ids_t, attention_mask=torch.tensor(mask, device=lm.device),
                              use_cache=False).logits
            for row, sequence in enumerate(batch):
                n = len(sequence)
                # log_softmax in float32 per row: a half-precision vocabulary-wide sum loses digits.
                logprobs = torch.log_softmax(logits[row, :n - 1].float(), dim=-1)
                text_sums.append(-logprobs.gather(-1, ids_t[row, 1:n, None]).sum().item())
    nll = float(sum(text_sums))
    n_tokens = sum(text_tokens)
    finite = all(math.isfinite(value) for value in text_sums)
    try:
        ppl = math.exp(nll / n_tokens) if finite else math.inf
    except OverflowError:
        ppl = math.inf
    if not finite:
        log.warning("held-out NLL is not finite: the model's outputs contain NaN or inf")
    text_nll = tuple(total / count if count else math.nan for total, count in zip(text_sums, text_tokens, strict=True))
    return PerplexityResult(ppl, nll, n_tokens, text_nll, tuple(text_tokens), n_truncated, finite)


def perplexity(lm: LoadedModel, texts: Sequence[str], *, max_length: int = 256, batch_size: int = 8) -> float:
    """``exp(total NLL / predicted tokens)`` of ``lm`` on ``texts``; ``inf`` if not finite (see :func:`score_texts`)."""
    return score_texts(lm, texts, max_length=max_length, batch_size=batch_size).perplexity


def snapshot_parameters(lm: LoadedModel, paths: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """CPU copies of the parameters at ``paths`` (None: every parameter), the reference of :func:`weight_health`.

    Every parameter costs a full copy of the model in host memory; pass the paths an editor
    may touch (e.g. ``lm.adapter.weight_path("mlp_out", layer)``) to keep it small.
    """
    named = dict(lm.model.named_parameters()) if paths is None else {p: get_parameter(lm.model, p) for p in paths}
    return {path: parameter.detach().to("cpu", copy=True) for path, parameter in named.items()}


def _singular_values(weight: torch.Tensor) -> torch.Tensor:
    # float64 on the CPU: sigma_min of a nearly singular matrix is lost in float32, and the
    # SVD of a 576 x 1536 matrix costs ~0.1 s. Transposing (Conv1D's in x out) changes nothing.
    # The SVD fails on NaN or inf entries; their singular values are reported as NaN.
    weight = weight.detach().to("cpu", torch.float64)
    if not torch.isfinite(weight).all():
        return torch.full((min(weight.shape),), math.nan, dtype=torch.float64)
    return torch.linalg.svdvals(weight)


def weight_health(lm: LoadedModel, reference: Mapping[str, torch.Tensor],
                  paths: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Statistics of each changed parameter relative to its value in ``reference``.

    Args:
        lm: the (edited) model.
        reference: parameter path -> unedited tensor (:func:`snapshot_parameters`).
        paths: the parameters to report, changed or not; None reports every parameter of
            ``reference`` whose value differs from it (bitwise).

    Returns:
        One dict per parameter, in ``reference`` order: ``parameter``, ``matrix`` (whether it
        is 2-D), ``rel_norm_growth`` (``||W - W0||_F / ||W0||_F``), ``spectral_norm`` (``sigma_max(W)``),
        ``spectral_ratio`` (``sigma_max(W) / sigma_max(W0)``), ``condition_number``
        (``sigma_max / sigma_min`` of ``W``) and ``reference_condition_number`` (of ``W0``).
        The spectral values are NaN for parameters that are not matrices or hold NaN or inf.

    Raises:
        KeyError: a path of ``paths`` is not in ``reference`` or not in the model.
    """
    chosen = list(reference) if paths is None else list(paths)
    rows = []
    for path in chosen:
        if path not in reference:
            raise KeyError(f"parameter {path!r} has no reference value (snapshot it first)")
        before = reference[path]
        after = get_parameter(lm.model, path).detach().to("cpu")
        if paths is None and torch.equal(after, before):
            continue
        before64, after64 = before.to(torch.float64), after.to(torch.float64)
        base = torch.linalg.vector_norm(before64).item()
        delta = torch.linalg.vector_norm(after64 - before64).item()
        row = {"parameter": path, "matrix": after.ndim == 2,
               "rel_norm_growth": delta / base if base else (0.0 if delta == 0 else math.inf)}
        if row["matrix"]:
            now, then = _singular_values(after), _singular_values(before)
            row["spectral_norm"] = now[0].item()
            row["spectral_ratio"] = _ratio(now[0].item(), then[0].item())
            row["condition_number"] = _ratio(now[0].item(), now[-1].item())
            row["reference_condition_number"] = _ratio(then[0].item(), then[-1].item())
        else:
            row.update({key: math.nan for key in _WEIGHT_KEYS[1:]})
        rows.append(row)
    return rows


def _ratio(numerator: float, denominator: float) -> float:
    if denominator == 0:
        return math.nan if numerator == 0 else math.inf
    return numerator / denominator


def _max(values: Sequence[float]) -> float:
    """Largest value, NaN if any is NaN (a NaN weight must not hide behind a finite one)."""
    return float(np.max(values)) if len(values) else math.nan


def heldout_interval(heldout: PerplexityResult, baseline: PerplexityResult | None = None, *, n_boot: int = 1000,
                     seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Bootstrap interval of the held-out perplexity, or of its ratio to ``baseline`` (paired).

    Texts are resampled with replacement, and each resample's perplexity is
    ``exp(sum of its NLL / sum of its tokens)``, so long texts weigh as much as their
    tokens do. With ``baseline`` (the unedited model on the same texts) the same
    resample is drawn for both and the interval is that of the ratio: the texts'
    difficulty cancels, as in every paired comparison of editkit. NaN when a value is
    not finite.
    """
    tokens = np.asarray(heldout.text_tokens, dtype=float)
    nll = np.asarray(heldout.text_nll, dtype=float) * tokens
    if baseline is not None:
        if len(baseline.text_nll) != len(heldout.text_nll) or baseline.text_tokens != heldout.text_tokens:
            raise ValueError("the baseline was scored on other texts: a paired interval needs the same texts")
        nll = nll - np.asarray(baseline.text_nll, dtype=float) * tokens
    if not np.isfinite(nll).all() or not tokens.sum():
        return math.nan, math.nan
    rng = np.random.default_rng([seed, len(tokens)])
    picks = rng.integers(0, len(tokens), size=(n_boot, len(tokens)))
    with np.errstate(over="ignore"):
        values = np.exp(nll[picks].sum(axis=1) / tokens[picks].sum(axis=1))
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def health_rows(heldout: PerplexityResult | None = None, weights: Sequence[Mapping[str, Any]] = (),
                baseline_ppl: float | PerplexityResult | None = None) -> list[dict[str, Any]]:
    """Tidy rows (``metric``, ``value``, ``parameter``, ``ci_low``, ``ci_high``) of one checkpoint's health.

    Summary rows have ``parameter`` None: ``heldout_ppl``, ``heldout_nll`` (mean per token),
    ``heldout_nonfinite`` (1.0 when the outputs were not finite), ``heldout_ppl_baseline``
    and ``heldout_ppl_ratio`` (when ``baseline_ppl`` is given), ``n_changed_parameters``,
    ``max_rel_norm_growth``, ``mean_rel_norm_growth``, ``max_spectral_ratio`` (0, 0 and 1
    when nothing changed) and ``max_condition_number`` (NaN when nothing changed). Then one
    row per parameter and statistic of ``weights`` (:func:`weight_health`), metric named
    as its key. Maxima propagate NaN. ``heldout_ppl`` carries its 95% bootstrap interval
    over texts, and ``heldout_ppl_ratio`` too when ``baseline_ppl`` is the unedited model's
    :class:`PerplexityResult` on the same texts (a paired interval,
    :func:`heldout_interval`); every other row's interval is NaN (a single measurement).

    Raises:
        ValueError: ``baseline_ppl`` is not a positive finite number.
    """
    rows: list[dict[str, Any]] = []

    def add(metric: str, value: float, parameter: str | None = None,
            interval: tuple[float, float] = (math.nan, math.nan)) -> None:
        rows.append({"metric": metric, "value": float(value), "parameter": parameter,
                     "ci_low": interval[0], "ci_high": interval[1]})

    baseline = baseline_ppl if isinstance(baseline_ppl, PerplexityResult) else None
    if baseline is not None:
        baseline_ppl = baseline.perplexity
    if heldout is not None:
        add("heldout_ppl", heldout.perplexity, interval=heldout_interval(heldout))
        add("heldout_nll", heldout.nll / heldout.n_tokens)
        add("heldout_nonfinite", 0.0 if heldout.finite else 1.0)
        if baseline_ppl is not None:
            if not (math.isfinite(baseline_ppl) and baseline_ppl > 0):
                raise ValueError(f"baseline_ppl must be a positive finite number, got {baseline_ppl}")
            add("heldout_ppl_baseline", baseline_ppl)
            paired = heldout_interval(heldout, baseline) if baseline is not None else (math.nan, math.nan)
            add("heldout_ppl_ratio", heldout.perplexity / baseline_ppl, interval=paired)
    matrices = [w for w in weights if w["matrix"]]
    add("n_changed_parameters", len(weights))
    growth = [w["rel_norm_growth"] for w in weights]
    add("max_rel_norm_growth", _max(growth) if weights else 0.0)
    add("mean_rel_norm_growth", float(np.mean(growth)) if weights else 0.0)
    add("max_spectral_ratio", _max([w["spectral_ratio"] for w in matrices]) if matrices else 1.0)
    add("max_condition_number", _max([w["condition_number"] for w in matrices]))
    for weight in weights:
        for key in _WEIGHT_KEYS:
            add(key, weight[key], weight["parameter"])
    return rows


@dataclass(frozen=True)
class HealthReport:
    """One checkpoint's health: the held-out score and the changed parameters' statistics."""

    heldout: PerplexityResult | None
    weights: tuple[dict[str, Any], ...]
    baseline_ppl: float | None = None

    def rows(self) -> list[dict[str, Any]]:
        """:func:`health_rows` of this report."""
        return health_rows(self.heldout, self.weights, self.baseline_ppl)


def measure_health(lm: LoadedModel, texts: Sequence[str] | None, reference: Mapping[str, torch.Tensor] | None,
                   *, baseline_ppl: float | None = None, max_length: int = 256, batch_size: int = 8) -> HealthReport:
    """:func:`score_texts` on ``texts`` and :func:`weight_health` against ``reference`` (either may be None)."""
    heldout = score_texts(lm, texts, max_length=max_length, batch_size=batch_size) if texts is not None else None
    weights = tuple(weight_health(lm, reference)) if reference is not None else ()
    return HealthReport(heldout, weights, baseline_ppl)


@dataclass(frozen=True)
class HealthAlarm:
    """Thresholds on :func:`health_rows` whose crossing means the model has broken down.

    Each threshold is None (not checked) or a positive number; a value above it, or a
    non-finite value, raises the alarm. Non-finite held-out outputs always do. Weight
    thresholds are checked only when some parameter changed.

    Attributes:
        max_ppl_ratio: held-out perplexity over the unedited model's (``heldout_ppl_ratio``).
        max_norm_growth: largest ``||W - W0||_F / ||W0||_F`` (``max_rel_norm_growth``).
        max_spectral_ratio: largest ``sigma_max(W) / sigma_max(W0)``.
        max_condition_number: largest condition number of a changed matrix.
    """

    max_ppl_ratio: float | None = 100.0
    max_norm_growth: float | None = None
    max_spectral_ratio: float | None = None
    max_condition_number: float | None = None

    def __post_init__(self) -> None:
        for name, value in ((f.name, getattr(self, f.name)) for f in fields(self)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= 0):
                raise ValueError(f"HealthAlarm.{name} must be None or a positive finite number, got {value!r}")

    def check(self, rows: Iterable[Mapping[str, Any]]) -> str | None:
        """A human-readable reason when a threshold is crossed, None otherwise.

        Raises:
            ValueError: a threshold is set but ``rows`` lack its metric (e.g. ``max_ppl_ratio``
                without a baseline perplexity given to :func:`health_rows`).
        """
        summary = {row["metric"]: row["value"] for row in rows if row.get("parameter") is None}
        reasons = []
        if summary.get("heldout_nonfinite") == 1.0:
            reasons.append("held-out perplexity is not finite: the model's outputs contain NaN or inf")
        elif self.max_ppl_ratio is not None:
            ratio = self._value(summary, "heldout_ppl_ratio", "max_ppl_ratio")
            if not ratio <= self.max_ppl_ratio:
                reasons.append(f"held-out perplexity {summary['heldout_ppl']:.3g} is {ratio:.3g}x the unedited "
                               f"{summary['heldout_ppl_baseline']:.3g} (alarm at {self.max_ppl_ratio:g}x)")
        if summary.get("n_changed_parameters", 0) > 0:
            for name, metric, what in (
                ("max_norm_growth", "max_rel_norm_growth", "relative weight norm growth"),
                ("max_spectral_ratio", "max_spectral_ratio", "spectral norm ratio"),
                ("max_condition_number", "max_condition_number", "condition number"),
            ):
                threshold = getattr(self, name)
                if threshold is None:
                    continue
                value = self._value(summary, metric, name)
                if not value <= threshold:  # also true for NaN
                    reasons.append(f"largest {what} of a changed parameter is {value:.3g} (alarm at {threshold:g})")
        return "; ".join(reasons) if reasons else None

    @staticmethod
    def _value(summary: Mapping[str, float], metric: str, threshold: str) -> float:
        if metric not in summary:
            raise ValueError(f"HealthAlarm.{threshold} needs the {metric!r} row, which is missing")
        return summary[metric]

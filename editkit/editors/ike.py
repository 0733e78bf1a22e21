"""IKE: in-context knowledge editing (Zheng et al., 2023, arXiv 2305.12740).

"Can We Edit Factual Knowledge by In-Context Learning?"

No weight changes. An edit is a *new fact* ``f = "{prompt} {target_new}"``; the model
answers an input x from a prompt of k demonstrations, the new fact and the input::

    New Fact: {f_1}\\nPrompt: {p_1} {a_1}\\n\\n ... New Fact: {f}\\nPrompt: {f}\\n\\nNew Fact: {f}\\nPrompt: {x}

Demonstrations come from the ``train`` split of the edit data (never from the edited
records): the k train facts nearest to the new fact by a sentence encoder
(all-MiniLM-L6-v2: cosine of mean-pooled, normalised embeddings between the query
``"New Fact: {f}\\nPrompt: {prompt}"`` and each train record's ``"New Fact: {f_i}\\nPrompt: {f_i}"``).
Each gets one of three types, in the ratio copy : update : retain = 1 : 3 : 4 (the
reference's 32-slot list holds 4, 12 and 16), assigned in a shuffled order:

* copy: ``Prompt: {f_i}`` (the prompt answered with its new target);
* update: ``Prompt: {a rephrase of prompt_i} {target_new_i}``;
* retain: ``Prompt: {a neighbourhood prompt of record i} {its answer}`` (the old fact stays).

The list is reversed (the most similar demonstration comes last) and, as the reference's
evaluation does, the edited fact's own copy demonstration is appended.

Lifelong use (not in the paper, which edits one fact at a time): every edit is kept in a
memory with its demonstrations; for an input, the stored fact most similar to it (the
same encoder, cosine against ``"{prompt} {target_new}"``) is the one the prompt is built
for. Every input is routed, as published (IKE's locality comes from its retain
demonstrations, not from a scope decision); ``min_similarity`` optionally leaves inputs
less similar than that to every stored fact untouched. IKE acts as a context router
(:class:`editkit.models.LoadedModel`): the evaluation engine and, through
:mod:`editkit.routing`, a direct ``lm.model(...)`` call both see the prompt.

Checked against Zce1112zslx/IKE (``icl.py``: demonstration types and formats, the
32-slot type list, the reversal and the appended copy of the new fact; ``encode_facts.py``:
the encoder and the sentences embedded) and EasyEdit (``easyeditor/models/ike/ike_main.py``,
``util.py``, ``hparams/IKE/gpt-j-6B.yaml``: k = 32). Known deviations:

* One embedding per train record (its copy sentence); the reference embeds 13 sentences
  per record (copy, 2 paraphrases, 10 neighbours) and its stored index file mixes
  sentence and record indices. Here the k nearest *records* are used, each once.
* The packaged CounterFact has one rephrase and one neighbourhood prompt per record, so
  update and retain demonstrations use those (the reference draws one of several).
* Scores come from the engine (log-probabilities of the target after the prompt), not
  the reference's perplexity ratio; the prompt text is the reference's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..config import Params
from ..datasets import edit_dataset
from ..editing import EditHandle, Editor
from ..models import LoadedModel
from ..paths import cache_root
from ..routing import add_router, remove_router
from ..training import data_digest
from ..types import EditRequest
from .serac import OFFLINE_ENCODER, load_encoder, sentence_embeddings

__all__ = ["IKE", "IKEParams", "demo_type_counts"]

log = logging.getLogger(__name__)

COPY, UPDATE, RETAIN = 0, 1, 2
_CACHE_SIZE = 50_000  # embeddings of recently routed contexts kept per editor
_CORPUS_FORMAT = "New Fact: {fact}\nPrompt: {fact}"  # encode_facts.py: a train record's sentence


@dataclass(frozen=True)
class IKEParams(Params):
    """IKE hyperparameters; defaults are the published GPT-J setting (module docstring).

    ``k``: demonstrations per edit (icl.py's 32-slot list; EasyEdit gpt-j-6B.yaml ``k: 32``).
    ``demo_ratio``: copy, update, retain (icl.py: 4, 12, 16 of 32). ``encoder``: the
    offline wheel of sentence-transformers' all-MiniLM-L6-v2 (encode_facts.py), a hub id or
    a folder. ``demo_template`` / ``query_template``: icl.py's formats. ``own_copy_demo``:
    append the edited fact's own copy demonstration (icl.py). ``train_records``: how many
    train records are candidates (0: all). ``min_similarity``: None routes every input
    (published); a cosine below which an input is left alone. ``seed``: icl.py's default.
    """

    k: int = 32
    demo_ratio: tuple[int, int, int] = (1, 3, 4)
    encoder: str = OFFLINE_ENCODER
    max_length: int = 256
    demo_template: str = "New Fact: {fact}\nPrompt: {prompt} {answer}\n\n"
    query_template: str = "New Fact: {fact}\nPrompt: {input}"
    own_copy_demo: bool = True
    train_data: str = "counterfact"
    train_records: int = 0
    min_similarity: float | None = None
    seed: int = 42

    def __post_init__(self) -> None:
        if self.k < 0 or len(self.demo_ratio) != 3 or min(self.demo_ratio) < 0 or sum(self.demo_ratio) < 1:
            raise ValueError(f"k must be >= 0 and demo_ratio three non-negative counts, got {self.k}, "
                             f"{self.demo_ratio}")
        if not self.query_template.endswith("{input}") or "{fact}" not in self.query_template:
            raise ValueError(f"query_template must contain {{fact}} and end with {{input}}, "
                             f"got {self.query_template!r}")
        for key in ("{fact}", "{prompt}", "{answer}"):
            if key not in self.demo_template:
                raise ValueError(f"demo_template must contain {key}, got {self.demo_template!r}")


def demo_type_counts(k: int, ratio: Sequence[int]) -> list[int]:
    """How many copy, update and retain demonstrations k slots get: ``ratio`` scaled, largest remainders first."""
    total = sum(ratio)
    exact = [k * r / total for r in ratio]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(ratio)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: k - sum(counts)]:
        counts[i] += 1
    return counts


def fact_text(request: EditRequest) -> str:
    return f"{request.prompt} {request.target_new}"


@dataclass(frozen=True)
class _Fact:
    id: int
    prompt: str
    target_new: str
    demos: tuple[str, ...]
    demo_case_ids: tuple[Any, ...]

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.target_new}"


class IKE(Editor):
    """In-context editing: a memory of new facts, each with its retrieved demonstrations."""

    name = "ike"
    batch_edits = True  # a batch adds its facts to the memory, as the same edits one by one would
    params_class = IKEParams

    def __init__(self, lm: LoadedModel, params: IKEParams) -> None:
        super().__init__(lm, params)
        self.encoder, self.encoder_tokenizer = load_encoder(params.encoder, lm.device)
        self.facts: list[_Fact] = []
        self.fact_embeddings: torch.Tensor | None = None
        self.next_id = 0
        self._train: list[EditRequest] | None = None
        self._train_embeddings: torch.Tensor | None = None
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    # -- embeddings ---------------------------------------------------------------------------

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Normalised embeddings of ``texts`` (recent ones cached)."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        with torch.no_grad():
            for start in range(0, len(missing), 64):
                chunk = missing[start : start + 64]
                for text, vector in zip(chunk, sentence_embeddings(self.encoder, self.encoder_tokenizer, chunk,
                                                                   self.params.max_length)):
                    self._cache[text] = vector
        for text in texts:
            self._cache.move_to_end(text)
        while len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return torch.stack([self._cache[t] for t in texts]) if texts else torch.zeros(0)

    def train_corpus(self) -> tuple[list[EditRequest], torch.Tensor]:
        """The candidate demonstration records (the data's train split) and their embeddings.

        The embeddings are cached on disk under the cache root, keyed by encoder, data
        files, record count and sentence format (10,000 CounterFact records take about
        two minutes on one CPU thread).
        """
        if self._train is None:
            params = self.params
            train, _ = edit_dataset(params.train_data).train_val(params.train_records or None, None)
            key = json.dumps([params.encoder, params.train_data, data_digest(params.train_data), len(train),
                              params.max_length, _CORPUS_FORMAT])
            path = cache_root() / "ike" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
            embeddings = None
            if path.is_file():
                stored = torch.load(path, weights_only=True)
                if stored["case_ids"] == [str(r.case_id) for r in train]:
                    embeddings = stored["embeddings"].to(self.lm.device)
            if embeddings is None:
                log.info("embedding %d %s train records for IKE's demonstrations (once; cached at %s)",
                         len(train), params.train_data, path)
                texts = [_CORPUS_FORMAT.format(fact=fact_text(r)) for r in train]
                with torch.no_grad():
                    embeddings = torch.cat([
                        sentence_embeddings(self.encoder, self.encoder_tokenizer, texts[at : at + 64],
                                            params.max_length) for at in range(0, len(texts), 64)])
                path.parent.mkdir(parents=True, exist_ok=True)
                partial = path.with_suffix(f".{os.getpid()}.partial")
                torch.save({"embeddings": embeddings.cpu(), "case_ids": [str(r.case_id) for r in train]}, partial)
                os.replace(partial, path)
            self._train, self._train_embeddings = train, embeddings
        return self._train, self._train_embeddings

    # -- demonstrations -----------------------------------------------------------------------

    def demonstrations(self, request: EditRequest) -> tuple[list[str], list[Any]]:
        """The demonstrations for ``request`` (prompt order) and the case ids they came from."""
        params = self.params
        fact = fact_text(request)
        demos: list[str] = []
        sources: list[Any] = []
        if params.k:
            train, embeddings = self.train_corpus()
            query = self.embed([f"New Fact: {fact}\nPrompt: {request.prompt}"])[0]
            scores = embeddings @ query.to(embeddings.device)
            same = [i for i, r in enumerate(train) if r.prompt == request.prompt]  # never the edited fact itself
            scores[same] = -torch.inf
            nearest = scores.topk(min(params.k, len(train) - len(same))).indices.tolist()  # most similar first
            rng = random.Random(f"{params.seed}|{request.prompt}|{request.target_new}")
            counts = demo_type_counts(len(nearest), params.demo_ratio)
            order = [COPY] * counts[0] + [UPDATE] * counts[1] + [RETAIN] * counts[2]
            rng.shuffle(order)
            for index, kind in zip(nearest, order):
                demos.append(self._demo(train[index], kind, rng))
                sources.append(train[index].case_id)
            demos.reverse()  # icl.py: the most similar demonstration sits next to the query
            sources.reverse()
        if params.own_copy_demo:
            demos.append(params.demo_template.format(fact=fact, prompt=request.prompt, answer=request.target_new))
        return demos, sources

    def _demo(self, record: EditRequest, kind: int, rng: random.Random) -> str:
        template, fact = self.params.demo_template, fact_text(record)
        if kind == UPDATE and record.rephrase_prompts:
            return template.format(fact=fact, prompt=rng.choice(record.rephrase_prompts), answer=record.target_new)
        if kind == RETAIN and record.locality_prompts:
            i = rng.randrange(len(record.locality_prompts))
            answers = record.locality_answers
            answer = answers[i] if i < len(answers) else record.target_true
            if answer:
                return template.format(fact=fact, prompt=record.locality_prompts[i], answer=answer)
        return template.format(fact=fact, prompt=record.prompt, answer=record.target_new)  # copy (or no data)

    # -- routing ------------------------------------------------------------------------------

    def retrieve(self, contexts: Sequence[str]) -> tuple[list[int], list[float]]:
        """For each context: the index of the most similar stored fact, and that cosine similarity."""
        if not self.facts or not contexts:
            return [-1] * len(contexts), [0.0] * len(contexts)
        if len(self.facts) == 1 and self.params.min_similarity is None:
            return [0] * len(contexts), [1.0] * len(contexts)  # nothing to choose: skip the encoder
        with torch.no_grad():
            similarity = self.embed(contexts) @ self.fact_embeddings.T
        best, index = similarity.max(dim=1)
        return index.tolist(), best.tolist()

    def route(self, contexts: Sequence[str]) -> list[str]:
        """Each context as IKE's prompt for its most similar stored fact (unchanged with an empty memory)."""
        index, similarity = self.retrieve(contexts)
        threshold = self.params.min_similarity
        routed = []
        for context, i, s in zip(contexts, index, similarity):
            if i < 0 or (threshold is not None and s < threshold):
                routed.append(context)
                continue
            fact = self.facts[i]
            routed.append("".join(fact.demos) + self.params.query_template.format(fact=fact.text, input=context))
        return routed

    # -- editing and state --------------------------------------------------------------------

    def _set_facts(self, facts: list[_Fact]) -> None:
        self.facts = facts
        self.fact_embeddings = self.embed([f.text for f in facts]) if facts else None
        if facts:
            add_router(self.lm, self)
        else:
            remove_router(self.lm, self)

    def _apply(self, requests: list[EditRequest], handle: EditHandle) -> None:
        added = []
        for request in requests:
            demos, sources = self.demonstrations(request)
            added.append(_Fact(self.next_id, request.prompt, request.target_new, tuple(demos), tuple(sources)))
            self.next_id += 1
        self._set_facts(self.facts + added)
        ids = frozenset(f.id for f in added)
        handle.add_undo(lambda: self._set_facts([f for f in self.facts if f.id not in ids]))
        for request, fact in zip(requests, added):
            handle.info.append({"case_id": request.case_id, "memory_size": len(self.facts),
                                "n_demos": len(fact.demos), "demo_case_ids": list(fact.demo_case_ids)})

    def reset(self) -> None:
        self._set_facts([])

    def state_dict(self) -> dict[str, Any]:
        return {"next_id": self.next_id,
                "facts": [{"id": f.id, "prompt": f.prompt, "target_new": f.target_new, "demos": list(f.demos),
                           "demo_case_ids": list(f.demo_case_ids)} for f in self.facts]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_id = int(state.get("next_id", 0))
        self._set_facts([_Fact(int(f["id"]), f["prompt"], f["target_new"], tuple(f["demos"]),
                               tuple(f.get("demo_case_ids", ()))) for f in state.get("facts", [])])

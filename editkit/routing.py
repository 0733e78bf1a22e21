"""Context routing on every forward call: memory editors (SERAC, IKE) seen by a plain ``lm.model(ids)``.

A memory editor never changes a weight: it rewrites the *text* of an input (prepends the
retrieved edit, or IKE's demonstrations and new fact) and lets the base model read it.
:class:`~editkit.benchmarks.Engine` applies the routers in ``lm.context_routers`` to each
context before it tokenizes (:meth:`Engine.route`); this module makes a direct call of the
model see the same edit, so that code outside the engine (held-out perplexity, a user's
own forward) measures the edited model and not the base one.

How. :func:`add_router` installs the router and, with the first one, a forward hook on the
whole model (:func:`editkit.hooks.attach_forward_hook`); :func:`remove_router` takes the
hook off with the last one, so a restored model runs with no hook at all. (A pre-hook only
refuses, before the model runs, a call that starts a key/value cache on a routed input.)
After the model has run on the caller's inputs, the forward hook, for each batch row:

1. decodes the row's real tokens (``attention_mask`` 1; left or right padding) to text,
   leaving out the tokens the tokenizer itself puts first (``tokenizer("")``, e.g. BOS);
2. applies the routers in order, as the engine does; an unchanged row keeps the output
   the model just gave it, bit for bit;
3. encodes a changed row's text whole, as the engine encodes a context (so a routed
   forward's last position gives the engine's logits, to float round-off), runs it alone
   (no padding; cut on the left to the model's positions; by the model of a
   :class:`Delegated` text, SERAC's counterfactual model, when it is one) and copies into the caller's
   output, at each of the caller's tokens, the logits of the routed token that ends where
   that token ends. Where the routed text merges a token across that point (IKE's
   ``"Prompt: "`` followed by ``"The"`` becomes ``" The"``), the last routed token ending
   before it is used: the prediction sees the whole edit context and never a character
   the caller's token had not reached. The caller's leading special tokens map to the
   end of the prepended context.

Limits, each a :class:`RoutingError` naming the way out, raised only when a row is routed:
a call that passes a key/value cache (``model.generate``: its cache would hold the
unrouted context; use :meth:`editkit.benchmarks.Engine.generate_until`, which routes the
context as text), ``labels`` (compute the loss from the returned logits), and ``output_hidden_states`` /
``output_attentions`` (those describe the unrouted pass). Not routed: a call with a
non-empty cache (it continues a sequence whose start was judged when the cache was
built) and a call given ``inputs_embeds`` instead of ids (there is no text to route). A routed call returns no
cache (``cache`` / ``past_key_values`` is None). The engine's own calls run inside :func:`unrouted`:
it has routed the text already.
"""

from __future__ import annotations

import bisect
import contextlib
import inspect
import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .hooks import attach_forward_hook, attach_forward_pre_hook
from .tokens import encode

if TYPE_CHECKING:
    from .models import LoadedModel

__all__ = ["Delegated", "RoutingError", "ForwardRouting", "add_router", "remove_router", "route_texts", "target_lm",
           "unrouted"]

log = logging.getLogger(__name__)

_ENGINE = "editkit.benchmarks.Engine"
_CACHE_ARGS = ("cache", "past_key_values")  # transformers 5 renames past_key_values to cache


class RoutingError(RuntimeError):
    """A forward call that a memory editor would route but that cannot be routed exactly."""


class Delegated(str):
    """A routed context to be answered by another model (SERAC's trained counterfactual model).

    A ``str`` (the routed text) that carries ``lm``, the :class:`~editkit.models.LoadedModel`
    that reads it instead of the edited one. It must share the edited model's tokenizer
    (scores and generations are compared token for token). The engine sends such contexts
    to ``lm`` (:meth:`editkit.benchmarks.Engine.score`, ``generate_until``), and so does
    the forward hook for a direct ``lm.model(...)`` call. A later router that rewrites
    the text returns a plain ``str``, and the delegation is dropped with it.
    """

    lm: LoadedModel

    def __new__(cls, text: str, lm: LoadedModel) -> Delegated:
        value = super().__new__(cls, text)
        value.lm = lm
        return value


def target_lm(text: str, default: LoadedModel) -> LoadedModel:
    """The model that reads routed ``text``: a :class:`Delegated` text's own, else ``default``."""
    return text.lm if isinstance(text, Delegated) else default


def route_texts(lm: LoadedModel, texts: Sequence[str]) -> list[str]:
    """``texts`` after every router in ``lm.context_routers``, in order (as :meth:`Engine.route`)."""
    texts = list(texts)
    for router in lm.context_routers:
        texts = list(router.route(texts))
    return texts


def add_router(lm: LoadedModel, router: Any) -> None:
    """Install ``router`` (once) and, with the first router, the forward routing hook."""
    if not any(installed is router for installed in lm.context_routers):
        lm.context_routers.append(router)
    if lm.forward_routing is None:
        lm.forward_routing = ForwardRouting(lm)


def remove_router(lm: LoadedModel, router: Any) -> None:
    """Remove ``router``; with the last router the hook comes off the model."""
    lm.context_routers[:] = [installed for installed in lm.context_routers if installed is not router]
    if not lm.context_routers and lm.forward_routing is not None:
        lm.forward_routing.remove()
        lm.forward_routing = None


@contextlib.contextmanager
def unrouted(lm: LoadedModel) -> Iterator[None]:
    """Calls of ``lm.model`` inside the block are not routed (re-entrant)."""
    routing = getattr(lm, "forward_routing", None)
    if routing is None:
        yield
        return
    with routing.bypassed():
        yield


def _cache_length(cache: Any) -> int:
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return len(cache) and int(cache[0][0].shape[-2])  # legacy tuple of (key, value) per layer


def _token_ends(tokenizer: Any, ids: Sequence[int], text: str) -> list[int]:
    """End character (in ``text``) of each token of ``ids``, which decode to ``text``."""
    if getattr(tokenizer, "is_fast", False):
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if list(encoding["input_ids"]) == list(ids):
            return [end for _, end in encoding["offset_mapping"]]
    # Not the tokenizer's own encoding of the text (or a slow tokenizer): decode prefixes.
    return [len(_decode(tokenizer, ids[: j + 1])) for j in range(len(ids))]


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _max_positions(config: Any) -> int | None:
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class ForwardRouting:
    """The forward hook that routes a direct model call (module docstring). One per model."""

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self.depth = 0  # > 0 inside unrouted() and inside the hook's own routed passes
        self.lead = encode(lm.tokenizer, "")  # what the tokenizer puts before any text (e.g. BOS)
        self.signature = inspect.signature(lm.model.forward)
        self.var_keyword = [p.name for p in self.signature.parameters.values() if p.kind is p.VAR_KEYWORD]
        self.handles = [attach_forward_pre_hook(lm.model, "", self.before, with_kwargs=True),
                        attach_forward_hook(lm.model, "", self, with_kwargs=True)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    @contextlib.contextmanager
    def bypassed(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1

    def plan(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
             ) -> list[tuple[int, torch.Tensor, list[int], list[int], nn.Module]]:
        """Per routed row: (row, caller columns of its tokens, routed ids, routed position per column, the model
        that reads them: the edited model, or a :class:`Delegated` text's own)."""
        tokenizer = self.lm.tokenizer
        rows = []
        for row in range(input_ids.shape[0]):
            columns = (torch.arange(input_ids.shape[1], device=input_ids.device) if attention_mask is None
                       else attention_mask[row].nonzero().flatten())
            ids = input_ids[row, columns].tolist()
            n_lead = len(self.lead) if self.lead and ids[: len(self.lead)] == self.lead else 0
            rows.append((row, columns, ids, n_lead, _decode(tokenizer, ids[n_lead:])))
        routed = route_texts(self.lm, [text for *_, text in rows])
        plans = []
        for (row, columns, ids, n_lead, text), new_text in zip(rows, routed):
            if new_text == text:
                continue
            if not new_text.endswith(text):
                raise RoutingError("a context router returned a text that does not end with its input; forward "
                                   f"routing needs the input last (use {_ENGINE} for this router)")
            start = len(new_text) - len(text)
            new_ids = encode(tokenizer, new_text)
            body = list(tokenizer(new_text, add_special_tokens=False)["input_ids"])
            new_lead = len(new_ids) - len(body)
            if new_lead < 0 or new_ids[new_lead:] != body:
                raise RoutingError("the tokenizer adds tokens after the text; forward routing cannot align the "
                                   f"routed input (use {_ENGINE})")
            new_ends = [0] * new_lead + _token_ends(tokenizer, body, new_text)
            ends = [0] * n_lead + _token_ends(tokenizer, ids[n_lead:], text)
            # The last routed token that ends where (or before) the caller's token ends.
            positions = [max(bisect.bisect_right(new_ends, start + end) - 1, 0) for end in ends]
            limit = _max_positions(self.lm.model.config)
            if limit is not None and len(new_ids) > limit:  # as the engine: keep the end, cut the left
                cut = len(new_ids) - limit
                new_ids, positions = new_ids[cut:], [max(p - cut, 0) for p in positions]
            plans.append((row, columns, new_ids, positions, target_lm(new_text, self.lm).model))
        return plans

    def _arguments(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        bound = dict(self.signature.bind_partial(*args, **kwargs).arguments)
        for name in self.var_keyword:
            bound.update(bound.pop(name, {}))
        return bound

    def before(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Pre-hook: a call that starts a key/value cache (``generate``'s first step) on a routed input fails
        here, before the model runs (the model fills the cache in place, so after the call it looks like a
        continuation)."""
        if self.depth or not self.lm.context_routers:
            return None
        bound = self._arguments(args, kwargs)
        cache = next((bound[name] for name in _CACHE_ARGS if bound.get(name) is not None), None)
        if cache is None or bound.get("input_ids") is None or _cache_length(cache) > 0:
            return None  # no cache, no text, or the continuation of an already judged sequence
        with self.bypassed():
            if self.plan(bound["input_ids"], bound.get("attention_mask")):
                self._check(bound, None)
        return None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        if self.depth or not self.lm.context_routers:
            return None
        bound = self._arguments(args, kwargs)
        input_ids = bound.get("input_ids")
        if input_ids is None or any(bound.get(name) is not None for name in _CACHE_ARGS):
            return None  # embeddings cannot be decoded; a call with a cache was judged by the pre-hook
        with self.bypassed():  # routers may run models of their own
            plans = self.plan(input_ids, bound.get("attention_mask"))
        if not plans:
            return None
        self._check(bound, output)
        width = input_ids.shape[1]
        keep = bound.get("logits_to_keep") or 0
        if isinstance(keep, int):
            kept = torch.arange(width - keep if keep else 0, width, device=input_ids.device)
        else:
            kept = torch.as_tensor(keep, device=input_ids.device)
        logits = output.logits.clone()
        with self.bypassed():
            for row, columns, new_ids, positions, model in plans:
                routed = self._row_logits(new_ids, positions, model)
                slot = torch.full((width,), -1, dtype=torch.long, device=input_ids.device)
                slot[columns] = torch.arange(len(columns), device=input_ids.device)
                chosen = slot[kept]
                present = (chosen >= 0).nonzero().flatten()
                logits[row, present] = routed[chosen[present]].to(logits.device, logits.dtype)
        output.logits = logits
        for name in _CACHE_ARGS:
            if getattr(output, name, None) is not None:
                setattr(output, name, None)  # it holds the unrouted inputs
        return output

    def _check(self, bound: dict[str, Any], output: Any) -> None:
        if any(bound.get(name) is not None for name in _CACHE_ARGS):
            raise RoutingError("a call that builds a key/value cache (model.generate) cannot be routed exactly: the "
                               f"cache would hold the unrouted context. Generate through {_ENGINE}.generate_until, "
                               "which routes the context as text, or call the model inside "
                               "editkit.routing.unrouted(lm) for the unedited model")
        if bound.get("labels") is not None:
            raise RoutingError("labels with a routed input: the loss would be the unrouted one; compute it from "
                               "the returned logits")
        if bound.get("output_hidden_states") or bound.get("output_attentions"):
            raise RoutingError("hidden states and attentions of a routed input are not returned (they would be "
                               "the unrouted pass's); call inside editkit.routing.unrouted(lm) for the base model's")
        if getattr(output, "logits", None) is None:
            raise RoutingError("forward routing needs a model output with .logits (return_dict=True)")

    def _row_logits(self, new_ids: list[int], positions: list[int], model: nn.Module) -> torch.Tensor:
        """Logits (len(positions) x vocab) of one routed row, run alone by ``model``."""
        device = next(model.parameters()).device
        ids = torch.tensor([new_ids], device=device)
        at = torch.tensor(positions, device=device)
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            return model(input_ids=ids, use_cache=False, logits_to_keep=at).logits[0]
        return model(input_ids=ids, use_cache=False).logits[0, at]

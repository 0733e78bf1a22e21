"""lm-evaluation-harness's model API over editkit's engine: run any lm-eval task on an edited model.

>>> import lm_eval
>>> from editkit.lm_eval_bridge import EditkitLM
>>> lm = editkit.load_model()  # doctest: +SKIP
>>> lm_eval.simple_evaluate(model=EditkitLM(lm), tasks=["hellaswag"])  # doctest: +SKIP

:class:`EditkitLM` subclasses ``lm_eval.api.model.LM`` and answers its three
requests with :class:`~editkit.benchmarks.Engine`, the only benchmark code that
runs the model, so lm-eval's tasks get the engine's batching and shared
prefixes, and every editor acts on them as on editkit's own tasks: weight and
hook editors through the model, routing editors (SERAC) through the engine's
context routers.

* ``loglikelihood``: :meth:`Engine.loglikelihood` of each ``(context,
  continuation)``; the context is routed.
* ``generate_until``: :meth:`Engine.generate_until`, greedy; ``until`` and
  ``max_gen_toks`` (or its aliases) are read as lm-eval's ``HFLM`` reads them.
  The engine also stops at the model's EOS tokens. A request that asks for
  sampling (``do_sample``, or a temperature above 0 without ``do_sample``) is an
  error: editkit decodes greedily only.
* ``loglikelihood_rolling``: the text's tokens (no special tokens) in lm-eval's
  disjoint windows of at most the engine's ``max_length`` tokens
  (``lm_eval.utils.get_rolling_token_windows``, context length 1), the first
  conditioned on the BOS token (EOS when there is none), each scored by
  :meth:`Engine.score_tokens`; the sum over windows. The text is routed as a
  whole: a router that rewrites it as ``prefix + text`` (SERAC's default
  template ends with the input) conditions the first window on the prefix's
  tokens instead of the BOS token; a rewrite that does not end with the text is
  an error.

Tokenisation is the engine's (lm-eval's ``_encode_pair`` with the tokenizer's
default special tokens), so scores equal :func:`editkit.evaluate`'s on the same
prompts. Chat templates (``apply_chat_template=True``) are not implemented.

This module needs lm-eval (``pip install 'editkit[lm_eval]'``, the pinned 0.4.13);
``import editkit`` does not import it. lm-eval 0.4.9 needed
``transformers.AutoModelForVision2Seq``, which transformers 5 removed; 0.4.13
imports under transformers 5 as it is, so no shim is needed.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

try:
    from lm_eval.api.model import LM
    from lm_eval.models.utils import normalize_gen_kwargs
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as error:  # pragma: no cover - exercised by a test that hides lm_eval
    raise ImportError("editkit.lm_eval_bridge needs lm-evaluation-harness: pip install 'editkit[lm_eval]'") from error

from .benchmarks.api import GenerationRequest
from .benchmarks.engine import Engine

if TYPE_CHECKING:
    from lm_eval.api.instance import Instance

    from .models import LoadedModel

__all__ = ["EditkitLM", "DEFAULT_MAX_GEN_TOKS"]

log = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HFLM default when a task gives no max_gen_toks


class EditkitLM(LM):
    """An editkit model, as lm-evaluation-harness's ``LM``; the model is unchanged by every call.

    Args:
        lm: a loaded (possibly edited) model, or an engine over one (its batch
            size and settings are then used as they are).
        batch_size: sequences per forward pass, or ``"auto"`` (see
            :class:`~editkit.benchmarks.Engine`); only when ``lm`` is a model.
        max_length: the longest input in tokens; default the model's maximum.
        progress: the engine's progress bars.

    Attributes:
        engine: the :class:`~editkit.benchmarks.Engine` that answers every request.
    """

    def __init__(self, lm: LoadedModel | Engine, *, batch_size: int | str = 8, max_length: int | None = None,
                 progress: bool = False) -> None:
        super().__init__()
        self.engine = lm if isinstance(lm, Engine) else Engine(lm, batch_size=batch_size, max_length=max_length,
                                                               progress=progress)

    @property
    def device(self) -> Any:
        return self.engine.device

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(log P(continuation | context), is_greedy)`` per request; contexts are routed."""
        pairs = [tuple(request.args) for request in requests]
        results = self.engine.loglikelihood(pairs)
        for pair, result in zip(pairs, results):
            self.cache_hook.add_partial("loglikelihood", pair, result)
        return results

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut before the first stop string; contexts are routed.

        Raises:
            ValueError: a request asks for sampling.
        """
        outputs = self.engine.generate_until([generation_request(*request.args) for request in requests])
        for request, output in zip(requests, outputs):
            self.cache_hook.add_partial("generate_until", request.args, output)
        return outputs

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole text, in lm-eval's disjoint windows (see the module docstring).

        Raises:
            ValueError: a context router rewrote a text into one that does not end with it.
        """
        texts = [request.args[0] for request in requests]
        routed = self.engine.route(texts)
        totals = [0.0] * len(texts)
        # A text routed to another model (SERAC's counterfactual one) is scored by that model's engine.
        for engine, positions in self.engine.by_engine(routed):
            windows, owners = [], []
            for index in positions:
                for window in self.rolling_windows(texts[index], routed[index]):
                    windows.append(window)
                    owners.append(index)
            for owner, score in zip(owners, engine.score_tokens(windows)):
                totals[owner] += score.logprob
        for text, total in zip(texts, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return totals

    def rolling_windows(self, text: str, routed: str | None = None) -> list[tuple[list[int], list[int]]]:
        """The ``(context ids, continuation ids)`` windows that score ``text`` (each token once).

        Args:
            text: the document.
            routed: the document after the context routers (None or ``text``: not rewritten).
        """
        tokenizer = self.engine.tokenizer
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        windows = [make_disjoint_window(window) for window in get_rolling_token_windows(
            token_list=ids, prefix_token=self.engine.prefix_token_id, max_seq_len=self.engine.max_length,
            context_len=1)]
        if routed is None or routed == text or not windows:
            return windows
        if not routed.endswith(text):
            raise ValueError("a context router rewrote a loglikelihood_rolling text into one that does not end "
                             f"with it ({routed[:80]!r}...); only a prefix can condition a rolling text")
        prefix = self.engine.encode(routed[: len(routed) - len(text)])
        _, first = windows[0]
        return [(prefix, first), *windows[1:]]


def generation_request(context: str, gen_kwargs: dict[str, Any]) -> GenerationRequest:
    """The engine's request for lm-eval's ``generate_until`` arguments ``(context, gen_kwargs)``.

    Raises:
        ValueError: the arguments ask for sampling, which the greedy engine cannot do.
    """
    kwargs = normalize_gen_kwargs(dict(gen_kwargs), DEFAULT_MAX_GEN_TOKS)
    if kwargs.get("do_sample"):
        raise ValueError(f"the task asks for sampling ({gen_kwargs}); editkit's engine decodes greedily only")
    until = kwargs.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    ignored = sorted(set(kwargs) - {"do_sample", "temperature", "max_gen_toks"})
    if ignored:
        log.debug("generate_until ignores %s (greedy decoding)", ", ".join(ignored))
    return GenerationRequest(context, tuple(until), int(kwargs["max_gen_toks"]))

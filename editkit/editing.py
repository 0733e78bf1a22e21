"""The editor protocol, exact undo, and the sequential session.

Every editor changes the model in place through :meth:`Editor.edit` and returns an
:class:`EditHandle`; ``handle.restore()`` puts back the bit-identical tensors the
edit replaced. Weight editors record a parameter's original the first time an edit
touches it. A :class:`EditSession` applies requests one after another (the normal
case in this package) and keeps one pristine copy of each parameter ever touched,
so a 1,000-edit run costs one copy per parameter, not one per edit.

Editors that change more than weights (GRACE's codebook, AlphaEdit's record of
earlier keys, SERAC's memory) register an undo callback on the handle with
:meth:`EditHandle.add_undo` and implement :meth:`Editor.reset`, which a session
calls when it restores the model; their saved-run state goes through
:meth:`Editor.state_dict` / :meth:`Editor.load_state_dict`.
"""

from __future__ import annotations

import abc
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .config import Params
from .hooks import get_parameter
from .types import EditRequest

if TYPE_CHECKING:
    from .models import LoadedModel

__all__ = ["Editor", "EditHandle", "EditSession", "EditCollapseError"]

log = logging.getLogger(__name__)


class EditCollapseError(RuntimeError):
    """An edit produced non-finite weights or failed numerically (an optimiser overflow, a
    singular solve); the model is restored before this is raised."""


# Messages of errors that mean the numbers broke, not the code: an optimiser step that
# overflowed ("value cannot be converted to type float without overflow"), NaN/Inf checks,
# a solve on a singular matrix. Anything else is a bug and is raised as it is.
_NUMERICAL = re.compile(r"overflow|\bnan\b|\binf\b|non-finite|not finite|singular", re.IGNORECASE)


def _numerical_failure(error: BaseException) -> bool:
    if isinstance(error, EditCollapseError):
        return False  # already says what collapsed
    if isinstance(error, ArithmeticError):
        return True
    return isinstance(error, RuntimeError) and bool(_NUMERICAL.search(str(error)))


def _request_list(requests: EditRequest | Iterable[EditRequest], caller: str) -> list[EditRequest]:
    """``requests`` as a non-empty list of :class:`EditRequest`, reading an iterable exactly once.

    A generator can be read only once, so callers use the returned list everywhere.

    Raises:
        ValueError: no requests.
        TypeError: ``requests`` is not iterable, or an item is not an EditRequest.
    """
    if isinstance(requests, EditRequest):
        return [requests]
    if isinstance(requests, (str, bytes)) or not isinstance(requests, Iterable):
        raise TypeError(f"{caller} expects an EditRequest or an iterable of them, got {type(requests).__name__}")
    batch = list(requests)
    if not batch:
        raise ValueError(f"{caller} needs at least one EditRequest, got an empty batch")
    for index, request in enumerate(batch):
        if not isinstance(request, EditRequest):
            raise TypeError(f"{caller}: item {index} is a {type(request).__name__}, expected EditRequest")
    return batch


@dataclass
class EditHandle:
    """Undo record of one :meth:`Editor.edit` call.

    Attributes:
        originals: parameter path -> a clone of the tensor before the edit.
        info: per-request diagnostics from the editor (losses, norms).
        undo: callbacks that take back non-weight changes, run last-first.
    """

    model: torch.nn.Module
    originals: dict[str, torch.Tensor] = field(default_factory=dict)
    info: list[dict[str, Any]] = field(default_factory=list)
    undo: list[Callable[[], None]] = field(default_factory=list)
    restored: bool = False

    @property
    def paths(self) -> list[str]:
        return list(self.originals)

    def add_undo(self, callback: Callable[[], None]) -> None:
        """Register ``callback`` to take back a non-weight change made by this edit."""
        self.undo.append(callback)

    def restore(self) -> None:
        """Undo non-weight changes, then copy the recorded originals back (bit-exact). Idempotent."""
        while self.undo:
            self.undo.pop()()
        with torch.no_grad():
            for path, original in self.originals.items():
                get_parameter(self.model, path).copy_(original)
        self.restored = True


class Editor(abc.ABC):
    """Base class: subclasses set ``name``, ``params_class`` and implement ``_apply``."""

    name: ClassVar[str]
    # True where one call of edit() on several requests is one joint update (MEMIT's least
    # squares, FT's batches), so a study may use edit_batch_size > 1; False where the method
    # edits one fact at a time (ROME, KN, GRACE) and a batch would only be a loop.
    batch_edits: ClassVar[bool] = False
    params_class: ClassVar[type[Params]]

    def __init__(self, lm: LoadedModel, params: Params) -> None:
        if not isinstance(params, self.params_class):
            raise TypeError(f"{type(self).__name__} needs {self.params_class.__name__}, got {type(params).__name__}")
        self.lm = lm
        self.params = params

    def edit(self, requests: EditRequest | Sequence[EditRequest]) -> EditHandle:
        """Apply ``requests`` in place and return the handle that undoes them.

        Raises:
            EditCollapseError: the update made a touched weight NaN or Inf, or the edit's
                arithmetic failed (an overflow in the optimiser, a singular solve); the
                model is restored first, so nothing is left half-edited.
        """
        requests = _request_list(requests, f"{type(self).__name__}.edit()")
        handle = EditHandle(self.lm.model)
        try:
            self._apply(requests, handle)
        except BaseException as error:
            handle.restore()
            if _numerical_failure(error):
                raise EditCollapseError(f"{self.name}: numerical failure during the edit "
                                        f"({type(error).__name__}: {error})") from error
            raise
        bad = [p for p in handle.paths if not torch.isfinite(get_parameter(self.lm.model, p)).all()]
        if bad:
            handle.restore()
            raise EditCollapseError(f"{self.name}: non-finite weights after the edit in {', '.join(bad)}")
        return handle

    @abc.abstractmethod
    def _apply(self, requests: list[EditRequest], handle: EditHandle) -> None:
        """Change the model for ``requests``, recording originals via :meth:`_update_weight`."""

    def _update_weight(self, handle: EditHandle, path: str, delta: torch.Tensor) -> None:
        """Add ``delta`` (already in the parameter's stored orientation) to a parameter.

        The update is rounded to float32 (or the parameter's dtype if wider), added there
        and the sum rounded once to the parameter's dtype: a bfloat16 or float16 model
        keeps its dtype and loses no more of the update than one rounding, and a float32
        model's result is the same as ``parameter += delta.float()``.
        """
        parameter = get_parameter(self.lm.model, path)
        if path not in handle.originals:
            handle.originals[path] = parameter.detach().clone()
        wide = torch.promote_types(parameter.dtype, torch.float32)
        with torch.no_grad():
            parameter.copy_(parameter.to(wide) + delta.to(parameter.device, wide))

    def state_dict(self) -> dict[str, Any]:
        """Editor state beyond the model's weights (e.g. caches a resumed run must reuse)."""
        return {}

    def reset(self) -> None:
        """Forget every non-weight change made by edits (codebooks, memories, key records).

        Called by :meth:`EditSession.restore`; state that does not depend on the
        edits (sampled context prefixes, covariance statistics) is kept.
        """

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def adopt_originals(self, originals: dict[str, torch.Tensor]) -> None:
        """Told, when a session resumes from saved weights, each parameter's value before the
        session's first edit (PRUNE restrains the perturbation accumulated since then)."""


class EditSession:
    """Sequential editing with one pristine copy per touched parameter.

    ``session.apply(request)`` edits; ``session.restore()`` returns the model to
    its state before the session (bit-exact); ``session.log`` is the ordered list
    of applied requests with the editor's diagnostics.
    """

    def __init__(self, editor: Editor) -> None:
        self.editor = editor
        self.pristine: dict[str, torch.Tensor] = {}
        self.log: list[tuple[EditRequest, dict[str, Any]]] = []

    @property
    def touched(self) -> list[str]:
        return list(self.pristine)

    def apply(self, requests: EditRequest | Iterable[EditRequest]) -> EditHandle:
        """Edit the model with ``requests`` (one request, or any iterable, read once) and log them.

        Raises:
            ValueError: ``requests`` is empty.
            TypeError: an item is not an :class:`EditRequest`.
        """
        batch = _request_list(requests, "EditSession.apply()")
        handle = self.editor.edit(batch)
        for path, original in handle.originals.items():
            self.pristine.setdefault(path, original)
        infos = list(handle.info)
        if len(infos) != len(batch):
            if infos:
                log.warning("%s reported %d diagnostics for %d requests; logging the requests without them",
                            self.editor.name, len(infos), len(batch))
            infos = [{} for _ in batch]
        self.log.extend(zip(batch, infos))
        handle.originals = {}  # the session's pristine copy is the undo record now
        handle.undo = []  # and editor.reset() takes back everything else
        return handle

    def edited_state(self) -> dict[str, torch.Tensor]:
        """Current values of every parameter the session has touched (for checkpoints)."""
        return {p: get_parameter(self.editor.lm.model, p).detach().clone() for p in self.pristine}

    def load_edited_state(self, state: dict[str, torch.Tensor]) -> None:
        """Overwrite parameters with a saved :meth:`edited_state`, recording pristine copies."""
        with torch.no_grad():
            for path, value in state.items():
                parameter = get_parameter(self.editor.lm.model, path)
                self.pristine.setdefault(path, parameter.detach().clone())
                parameter.copy_(value)
        self.editor.adopt_originals(self.pristine)

    def restore(self) -> None:
        with torch.no_grad():
            for path, original in self.pristine.items():
                get_parameter(self.editor.lm.model, path).copy_(original)
        self.editor.reset()
        self.pristine = {}
        self.log = []

"""Module lookup by dotted path and forward hooks that always come off.

Editors never re-implement a model: they read and change activations of the
unmodified HuggingFace modules through plain forward hooks, registered inside a
``with`` block and removed in ``finally``. This module is the only place that
registers hooks; the hooks that outlive a call (GRACE's codebook adaptor, which stays on
while the codebook has entries, and the forward routing of SERAC and IKE) go through
:func:`attach_forward_hook`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["get_module", "get_parameter", "forward_hooks", "forward_pre_hooks", "inputs_only_at", "capture",
           "attach_forward_hook", "attach_forward_pre_hook", "by_position", "replaced_forward"]

HookFn = Callable[[nn.Module, tuple, object], object]
PreHookFn = Callable[[nn.Module, tuple], object]


def get_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted ``path``; a clear error if it is absent."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise KeyError(f"{type(model).__name__} has no module {path!r}") from None


def get_parameter(model: nn.Module, path: str) -> nn.Parameter:
    """The parameter at dotted ``path`` (e.g. ``model.layers.3.mlp.down_proj.weight``)."""
    try:
        return model.get_parameter(path)
    except AttributeError:
        raise KeyError(f"{type(model).__name__} has no parameter {path!r}") from None


@contextlib.contextmanager
def _registered(model: nn.Module, hooks: Sequence[tuple[str, Callable]], pre: bool) -> Iterator[None]:
    # Every hook is removed in `finally`, also when registering a later one fails.
    handles = []
    try:
        for path, fn in hooks:
            module = get_module(model, path)
            handles.append(module.register_forward_pre_hook(fn) if pre else module.register_forward_hook(fn))
        yield
    finally:
        for handle in handles:
            handle.remove()


def forward_hooks(model: nn.Module, hooks: Sequence[tuple[str, HookFn]]) -> contextlib.AbstractContextManager[None]:
    """Register ``(module_path, fn)`` forward hooks for the duration of the block.

    ``fn(module, inputs, output)`` may return a replacement output, as in
    :meth:`torch.nn.Module.register_forward_hook`.
    """
    return _registered(model, hooks, pre=False)


def forward_pre_hooks(model: nn.Module, hooks: Sequence[tuple[str, PreHookFn]]
                      ) -> contextlib.AbstractContextManager[None]:
    """Register ``(module_path, fn)`` forward *pre*-hooks for the duration of the block.

    ``fn(module, inputs)`` may return replacement inputs, as in
    :meth:`torch.nn.Module.register_forward_pre_hook`.
    """
    return _registered(model, hooks, pre=True)


@contextlib.contextmanager
def replaced_forward(model: nn.Module, paths: Sequence[str], fn: Callable[..., object]) -> Iterator[None]:
    """Call ``fn(*args, **kwargs)`` instead of the ``forward`` of the modules at ``paths``, for the block.

    Hooks registered on those modules still run around ``fn``. The modules'
    own ``forward`` is back when the block exits, also on an error.
    """
    modules = [get_module(model, path) for path in paths]
    try:
        for module in modules:
            module.forward = fn
        yield
    finally:
        for module in modules:
            if "forward" in vars(module):
                del module.forward


def inputs_only_at(model: nn.Module, path: str, rows: torch.Tensor, positions: torch.Tensor
                   ) -> contextlib.AbstractContextManager[None]:
    """Feed the module at ``path`` only its input at ``(rows, positions)``, for the block.

    Used on the unembedding: the model's logits come back as ``(1, queries, vocab)``,
    so the vocabulary projection runs on the few positions a loss reads, not on every
    token of every prompt. The input is viewed as ``(batch, tokens, width)``.
    """

    def select(module: nn.Module, args: tuple) -> tuple:
        return (args[0][rows, positions].unsqueeze(0), *args[1:])

    return forward_pre_hooks(model, [(path, select)])


def attach_forward_hook(model: nn.Module, path: str, fn: Callable[..., object], *,
                        with_kwargs: bool = False) -> RemovableHandle:
    """Register a forward hook that stays until the caller removes the returned handle.

    Only for adaptors that must act on every later call (GRACE's codebook, the
    forward routing of memory editors in :mod:`editkit.routing`, on the whole model:
    ``path=""``); the owner removes it when its state empties and on every undo.
    With ``with_kwargs`` the hook is called as ``fn(module, args, kwargs, output)``.
    Anything that lives for one computation uses :func:`forward_hooks` instead.
    """
    return get_module(model, path).register_forward_hook(fn, with_kwargs=with_kwargs)


def attach_forward_pre_hook(model: nn.Module, path: str, fn: Callable[..., object], *,
                            with_kwargs: bool = False) -> RemovableHandle:
    """As :func:`attach_forward_hook`, for a forward *pre*-hook (``fn(module, args[, kwargs])``)."""
    return get_module(model, path).register_forward_pre_hook(fn, with_kwargs=with_kwargs)


def by_position(activation: torch.Tensor, batch: int) -> torch.Tensor:
    """``activation`` viewed as ``(batch, positions, width)``.

    Most blocks keep the token axis, but some MLPs (OPT's) run on the tokens
    flattened to ``(batch * positions, width)``; this is the one place that undoes it.
    """
    return activation if activation.dim() == 3 else activation.view(batch, -1, activation.shape[-1])


@contextlib.contextmanager
def capture(model: nn.Module, paths: Sequence[str], inputs: bool = True, outputs: bool = True) -> Iterator[dict]:
    """Record the first positional input and the output of modules at ``paths``.

    Yields a dict filled during the block: ``store[path] = (input, output)``
    (``None`` where not requested). Tensors are kept as produced (not detached),
    so gradients can flow through them when needed.
    """
    store: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}

    def make(path: str) -> HookFn:
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            out = output[0] if isinstance(output, tuple) else output
            store[path] = (args[0] if inputs else None, out if outputs else None)

        return hook

    with forward_hooks(model, [(p, make(p)) for p in paths]):
        yield store

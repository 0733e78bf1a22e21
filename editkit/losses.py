"""The negative log-likelihood of target tokens, shared by every editor that optimises one.

ROME/MEMIT/PMET's target-value optimisation (:mod:`editkit.locate`), FT, MEND and
GRACE all minimise the same quantity: for each request, the mean over its target
tokens of ``-log p(y_j | context_j)``. The model computes logits only at the
positions this loss reads (the vocabulary projection dominates a small model's
cost), so the function takes those rows and says, for every target token, which
row predicts it.
"""

from __future__ import annotations

import torch

__all__ = ["group_mean", "target_nll"]


def group_mean(values: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Mean of ``values`` within each of ``n_groups`` groups.

    Args:
        values: ``(N,)`` floating point.
        groups: ``(N,)`` long, the group of each value, in ``[0, n_groups)``.
        n_groups: G.

    Returns:
        ``(G,)`` in the dtype of ``values``; a group with no values is 0. Sums run
        in the order of ``values`` (``index_add``).
    """
    total = values.new_zeros(n_groups).index_add(0, groups, values)
    count = values.new_zeros(n_groups).index_add(0, groups, torch.ones_like(values))
    return total / count.clamp(min=1)


def target_nll(logits: torch.Tensor, targets: torch.Tensor, queries: torch.Tensor | None = None,
               groups: torch.Tensor | None = None, n_groups: int | None = None) -> torch.Tensor:
    """Mean negative log-likelihood of target tokens per group (request), from logits at the rows read.

    For group g with target tokens T_g::

        nll_g = -(1/|T_g|) Σ_{t ∈ T_g} log_softmax(logits[queries[t]])[targets[t]]

    The log-softmax runs in float32 over the rows of ``logits`` only; no other
    position of the batch enters the loss.

    Args:
        logits: ``(Q, V)`` scores at the Q positions the loss reads (any float dtype).
        targets: ``(T,)`` long, the target token ids.
        queries: ``(T,)`` long, the row of ``logits`` that predicts each target (several
            targets may share a row, as in FT's ``prompt_last``); None means row t
            predicts target t (Q == T).
        groups: ``(T,)`` long, the group (request, or edit) of each target token; None
            puts every target in one group.
        n_groups: G, needed with ``groups``.

    Returns:
        ``(G,)`` float32 per-group mean NLL (0 for a group without targets). Callers
        reduce it: the mean over requests (ROME's v*, FT), the sum over edits (MEND's
        gradient), or the single value (GRACE).
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    rows = torch.arange(len(targets), device=logits.device) if queries is None else queries
    token_ll = log_probs[rows, targets]
    if groups is None:
        return -group_mean(token_ll, torch.zeros_like(targets), 1)
    if n_groups is None:
        raise ValueError("target_nll needs n_groups when groups is given")
    return -group_mean(token_ll, groups, n_groups)

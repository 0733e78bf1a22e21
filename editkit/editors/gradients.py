"""Teacher-forced passes and the per-token gradient factors of a linear map, shared by MEND and UltraEdit.

For ``y = W u`` inside the model, the gradient of a loss over a sequence is
``∇_W L = Σ_t δ_t u_tᵀ`` with ``u_t`` the module's input at token t and ``δ_t = ∂L/∂y_t``.
:func:`token_factors` reads (u_t, δ_t) for the teacher-forced NLL of each edit's
``target_new`` after its prompt, from one forward and backward pass of the current model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from ..hooks import forward_hooks, get_module, inputs_only_at
from ..losses import target_nll
from ..tokens import encode, encode_pair, pad_batch, target_text
from ..types import EditRequest

if TYPE_CHECKING:
    from ..models import LoadedModel

__all__ = ["TargetPass", "projection_path", "token_factors"]


def projection_path(lm: LoadedModel, layer: int, role: str, editor: str) -> str:
    """The module path of the 2-D projection ``role`` of block ``layer`` (negative: from the last).

    ``role`` is an adapter role (``mlp_in``) or, with a dot, a path inside the block
    (``mlp.gate_proj``). Raises ValueError naming ``editor`` for a block out of range or a
    module without a 2-D weight.
    """
    index = layer + lm.n_layers if layer < 0 else layer
    if not 0 <= index < lm.n_layers:
        raise ValueError(f"{editor} layer {layer} is out of range for {lm.name} ({lm.n_layers} layers)")
    path = f"{lm.adapter.path('blocks', index)}.{role}" if "." in role else lm.adapter.path(role, index)
    try:
        weight = getattr(get_module(lm.model, path), "weight", None)
    except KeyError:
        weight = None
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{editor} edits 2-D projection weights; {path} has none")
    return path


class TargetPass:
    """Rows of one forward pass and the (row, position) pairs whose next-token log-probs are read."""

    def __init__(self) -> None:
        self.rows: list[list[int]] = []
        self.queries: list[tuple[int, int]] = []

    def add(self, ids: list[int], positions: Sequence[int]) -> range:
        """Append a row; returns the indices of its queries."""
        start = len(self.queries)
        self.queries.extend((len(self.rows), p) for p in positions)
        self.rows.append(ids)
        return range(start, len(self.queries))

    def add_target(self, tokenizer: Any, prompt: str, target: str) -> tuple[range, list[int]]:
        """A teacher-forced row for ``target`` after ``prompt``: its queries and their labels."""
        context, answer = encode_pair(tokenizer, prompt, target_text(target))
        if not answer:
            raise ValueError(f"target {target!r} has no tokens after prompt {prompt!r}")
        ids = context + answer[:-1]
        return self.add(ids, range(len(context) - 1, len(ids))), answer

    def logits(self, lm: LoadedModel, hooks: Sequence = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (queries x vocab, float32) and the attention mask of the padded batch."""
        device = lm.device
        ids, mask = pad_batch(self.rows, lm.tokenizer.pad_token_id)
        ids, mask = torch.tensor(ids, device=device), torch.tensor(mask, device=device)
        rows = torch.tensor([r for r, _ in self.queries], device=device)
        positions = torch.tensor([p for _, p in self.queries], device=device)
        with inputs_only_at(lm.model, lm.adapter.path("unembed"), rows, positions), forward_hooks(lm.model, hooks):
            logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return logits[0].float(), mask

    def log_probs(self, lm: LoadedModel, hooks: Sequence = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities (queries x vocab, float32) and the attention mask of the padded batch."""
        logits, mask = self.logits(lm, hooks)
        return logits.log_softmax(-1), mask


def token_factors(lm: LoadedModel, paths: Sequence[str], edits: Sequence[list[EditRequest]], extra: Sequence[str] = (),
                  at: Literal["tokens", "targets"] = "tokens",
                  ) -> tuple[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], list[torch.Tensor], Any]:
    """u and δ at every edited module for each edit's teacher-forced NLL, from one pass of the current model.

    Each edit's loss is the mean NLL over its target tokens; their sum is backpropagated
    to the modules' outputs (rows do not interact, so each edit's δ is its own gradient).
    ``extra`` texts run in the same pass for their log-probabilities at every position.
    ``at="tokens"`` keeps every token of the edit rows where u and δ are nonzero (MEND);
    ``at="targets"`` keeps only the positions whose next token is a target token (the
    teacher-forced answer positions; UltraEdit).

    Returns:
        per path ``(u, δ, edit)`` (tokens x in, tokens x out, the edit of each token;
        detached), per edit the per-request NLLs, and the log-probs of the ``extra``
        rows (their queries in row order) or None.
    """
    if at not in ("tokens", "targets"):
        raise ValueError(f"at must be 'tokens' or 'targets', got {at!r}")
    tokenizer, device = lm.tokenizer, lm.device
    batch = TargetPass()
    queries, labels, query_edit, query_request = [], [], [], []
    row_edit = []
    for e, requests in enumerate(edits):
        for request in requests:
            rows, answer = batch.add_target(tokenizer, request.prompt, request.target_new)
            queries.extend(rows)
            labels.extend(answer)
            query_edit.extend([e] * len(rows))
            query_request.extend([len(row_edit)] * len(rows))
            row_edit.append(e)
    n_edit_rows = len(batch.rows)
    for ids in (encode(tokenizer, text) for text in extra):
        batch.add(ids, range(len(ids)))
    store: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def capture(path: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            # Adding a zero leaf that wants a gradient puts the output on the tape (the
            # model's own weights do not require grad); the values are unchanged.
            tracked = output + output.new_zeros(()).requires_grad_()
            store[path] = (args[0].detach(), tracked)
            return tracked

        return hook

    with torch.enable_grad():
        logits, mask = batch.logits(lm, [(p, capture(p)) for p in paths])
        target_logits = logits[torch.tensor(queries, device=device)]
        label_ids = torch.tensor(labels, device=device)
        edit_of_query = torch.tensor(query_edit, device=device)
        loss = target_nll(target_logits, label_ids, groups=edit_of_query, n_groups=len(edits)).sum()
        deltas = torch.autograd.grad(loss, [store[p][1] for p in paths])
    request_of_query = torch.tensor(query_request, device=device)
    request_nll = target_nll(target_logits.detach(), label_ids, groups=request_of_query, n_groups=n_edit_rows)
    real = mask[:n_edit_rows].bool()
    answer = torch.zeros_like(real)
    for row, position in batch.queries[:len(queries)]:
        answer[row, position] = True
    target_positions = answer[real]
    token_edit = torch.tensor(row_edit, device=device)[:, None].expand_as(real)[real]
    factors = []
    for path, delta in zip(paths, deltas):
        n_rows = mask.shape[0]
        u = store[path][0].reshape(n_rows, -1, store[path][0].shape[-1])[:n_edit_rows][real]
        d = delta.reshape(n_rows, -1, delta.shape[-1])[:n_edit_rows][real]
        # Tokens where u or δ is zero add nothing to the gradient; as the reference, they
        # are left out (of the statistics too). In the last block δ is zero away from the
        # positions a loss reads, so the kept tokens differ from module to module.
        keep = (u != 0).any(-1) & (d != 0).any(-1)
        if at == "targets":
            keep &= target_positions
        factors.append((u[keep], d[keep], token_edit[keep]))
    per_edit, start = [], 0
    for requests in edits:
        per_edit.append(request_nll[start:start + len(requests)])
        start += len(requests)
    extra_lp = logits[len(queries):].detach().log_softmax(-1) if extra else None
    return factors, per_edit, extra_lp

"""GRACE: General Retrieval Adaptors for Continual Editing (Hartvigsen et al., 2023, arXiv 2211.11031).

A codebook adaptor sits on one module (an MLP projection of a late layer); the
model's weights are never changed. The codebook holds entries ``(k_i, v_i, ε_i, y_i)``:
a key (the module's input at an edited prompt), a value (a replacement for the
module's output there), a deferral radius and the label (target) it was trained for.

Inference, for a module input ``h`` at one token::

    i* = argmin_i |h − k_i|₂
    out = v_i*            if |h − k_i*|₂ ≤ ε_i*
          module(h)       otherwise

Editing one request (prompt x, target y), with query ``h`` = the module's input at
the last token of x and ``d = |h − k_i*|``:

* empty codebook, or ``d > ε₀ + ε_i*``: add ``(h, v₀, ε₀, y)``;
* ``d ≤ ε₀ + ε_i*`` and ``y ≠ y_i*``: add ``(h, v₀, d/2, y)`` and shrink
  ``ε_i* = d/2 − 1e-5`` (the two balls are split);
* ``d ≤ ε₀ + ε_i*`` and ``y = y_i*``: ``eps_expand="coverage"`` grows
  ``ε_i* = max(ε_i*, d)``; ``"moving_average"`` also moves ``k_i* ← (k_i* + h)/2``;
  the existing value is then trained further.

``v₀`` is ``U[0, 1)`` noise (``val_init="cold"``) or the module's current output
(``"warm"``). The chosen value is trained with Adam (``edit_lr``) for ``n_iter``
steps on the teacher-forced NLL of the target tokens after the prompt, averaged
over tokens, with the adaptor active.

Checked against thartvigsen/grace (``grace/editors/grace.py``) and EasyEdit's
``easyeditor/models/grace/GRACE.py`` with ``hparams/GRACE/*.yaml``, including the
study's copies in lqinfdim/EditingEvaluation. Defaults are the study's GPT2-XL file
(``transformer.h[35].mlp.c_fc``, i.e. role ``mlp_in`` at layer 35; n_iter 200; lr 1.0;
eps 1.0; cold init; replace_last; coverage). Per-model values live in
``editkit/configs/grace.yaml``.

Which token is queried. The references query one position per forward call: the
last prompt token while editing; at inference the call's last token (thartvigsen,
EasyEdit's ``generate``) or an index frozen at edit time (EasyEdit's scoring, wrong
for prompts of another length). Here *every* position of every call is a query,
compared with its own nearest key. As keys are stored from the last prompt token,
this replaces where the reference does on a prompt whatever the batching, padding
side or key/value caching (left-padded contexts, a few-shot prefix run once, a
target run on top of the cache, step-wise generation, one teacher-forced pass over
prompt + target), and needs no attention mask. Known deviations:

* Any other position inside a ball is replaced too (e.g. an edited prompt quoted
  in a longer input); training uses the same rule as inference.
* ``replace_prompt`` (the positions before the matched token, not the token, as the
  reference) and ``replace_all`` (the row's every position) act within the forward
  call holding the match, not on cached positions or on a continuation run in a
  later call. Only ``replace_last`` is invariant to how an input is split, and the
  only rule for modules that flatten batch and positions (OPT's MLP).
* Distances in float64 (the reference: ``torch.cdist`` in float32, whose matrix
  form loses small distances), and a query counts as inside a ball up to
  ``1e-5 |h|`` beyond the radius: a key recomputed in another batch differs by
  round-off, and coverage puts the query it grew for exactly on the boundary.
* Labels are compared as target token ids (the reference: the mean of the masked
  label tensor, which also depends on the prompt's length).
* A key *identical* to a stored key with another label cannot be split (the
  reference leaves radius −1e-5 and the edit never fires): the entry is relabelled
  and its value re-initialised and trained.
* ``val_train``/``num_pert`` (a no-op at batch size 1), ``val_reg``, ``reg`` and
  ``dropout`` do nothing with the published values and are not accepted; every
  reference file uses ``dist_fn: euc``. ``early_stop_loss`` is an addition (off).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from ..config import Params
from ..editing import EditCollapseError, EditHandle, Editor
from ..hooks import attach_forward_hook, capture, get_module
from ..losses import target_nll
from ..prefix_cache import PrefixCachedBatch, SplitUnsupported
from ..tokens import encode_pair, target_text
from ..types import EditRequest

if TYPE_CHECKING:
    from ..models import LoadedModel

__all__ = ["GRACE", "GRACEParams", "Codebook"]

log = logging.getLogger(__name__)

_CHUNK = 4096  # query rows per float64 distance block (bounds memory on long batches)
_SLACK = 1e-5  # tolerance beyond a radius, relative to the query's norm (module docstring)


@dataclass(frozen=True)
class GRACEParams(Params):
    """GRACE hyperparameters (names as in the reference's hparams files; ``layers`` + ``role``
    replace its ``inner_params`` path)."""

    layers: tuple[int, ...] = (35,)
    role: Literal["mlp_in", "mlp_out", "mlp", "attn_out"] = "mlp_in"
    edit_lr: float = 1.0
    n_iter: int = 200
    eps: float = 1.0
    dist_fn: Literal["euc"] = "euc"
    val_init: Literal["cold", "warm"] = "cold"
    replacement: Literal["replace_last", "replace_prompt", "replace_all"] = "replace_last"
    eps_expand: Literal["coverage", "moving_average"] = "coverage"
    early_stop_loss: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.layers) != 1:
            raise ValueError(f"GRACE adapts exactly one layer, got layers={self.layers}")
        if self.n_iter < 1 or self.edit_lr <= 0 or self.eps <= 0:
            raise ValueError("n_iter, edit_lr and eps must be positive")


@dataclass
class Codebook:
    """GRACE's entries: keys (float64), values (float32), radii (float64), labels and stable ids."""

    keys: torch.Tensor
    values: torch.Tensor
    radii: torch.Tensor
    labels: list[tuple[int, ...]] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    next_id: int = 0

    @classmethod
    def empty(cls, device: Any = None) -> Codebook:
        zeros = torch.zeros(0, 0, dtype=torch.float64, device=device)
        return cls(zeros, zeros.float(), zeros.new_zeros(0))

    def __len__(self) -> int:
        return len(self.ids)

    def hits(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whether each row of ``queries`` lies in its nearest key's ball, and that key's index."""
        dists, index, norms = self.nearest(queries)
        return dists <= self.radii[index] + _SLACK * norms, index

    def nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For each row of ``queries`` (M x d): distance to and index of the nearest key, and its norm."""
        keys = self.keys
        key_sq = (keys * keys).sum(1)
        dists, index, norms = [], [], []
        for chunk in queries.split(_CHUNK):
            q = chunk.detach().to(torch.float64)
            q_sq = (q * q).sum(1)
            # |q - k|² expanded; float64 keeps a query equal to a key at distance ~1e-6, not ~1.
            d2 = q_sq[:, None] + key_sq[None] - 2.0 * q @ keys.T
            smallest, where = d2.clamp_min(0).min(1)
            dists.append(smallest.sqrt())
            index.append(where)
            norms.append(q_sq.sqrt())
        return torch.cat(dists), torch.cat(index), torch.cat(norms)

    def position(self, entry_id: int) -> int:
        return self.ids.index(entry_id)

    def add(self, key: torch.Tensor, value: torch.Tensor, radius: float, label: tuple[int, ...]) -> int:
        if not len(self):  # widths come from the first entry
            self.keys = self.keys.new_zeros(0, key.numel()).to(key.device)
            self.values = self.values.new_zeros(0, value.numel()).to(value.device)
            self.radii = self.radii.to(key.device)
        self.keys = torch.cat([self.keys, key.detach().to(torch.float64).reshape(1, -1)])
        self.values = torch.cat([self.values, value.detach().to(torch.float32).reshape(1, -1)])
        self.radii = torch.cat([self.radii, self.radii.new_tensor([radius])])
        self.labels.append(tuple(label))
        self.ids.append(self.next_id)
        self.next_id += 1
        return self.ids[-1]

    def entry(self, entry_id: int) -> tuple[torch.Tensor, torch.Tensor, float, tuple[int, ...]]:
        i = self.position(entry_id)
        return self.keys[i].clone(), self.values[i].clone(), float(self.radii[i]), self.labels[i]

    def set_entry(self, entry_id: int, key: torch.Tensor, value: torch.Tensor, radius: float,
                  label: tuple[int, ...]) -> None:
        i = self.position(entry_id)
        self.keys[i], self.values[i], self.radii[i], self.labels[i] = key, value, radius, tuple(label)

    def remove(self, entry_ids: set[int]) -> None:
        keep = [i for i, entry_id in enumerate(self.ids) if entry_id not in entry_ids]
        index = torch.tensor(keep, dtype=torch.long, device=self.keys.device)
        self.keys, self.values, self.radii = self.keys[index], self.values[index], self.radii[index]
        self.labels = [self.labels[i] for i in keep]
        self.ids = [self.ids[i] for i in keep]

    def state_dict(self) -> dict[str, Any]:
        # Copies: entries are later changed in place, which must not reach a saved state.
        return {"keys": self.keys.to("cpu", copy=True), "values": self.values.to("cpu", copy=True),
                "radii": self.radii.to("cpu", copy=True),
                "labels": [list(label) for label in self.labels], "ids": list(self.ids), "next_id": self.next_id}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: Any) -> Codebook:
        tensors = [state[name].to(device, dtype, copy=True) for name, dtype in
                   (("keys", torch.float64), ("values", torch.float32), ("radii", torch.float64))]
        book = cls(*tensors, [tuple(int(t) for t in label) for label in state["labels"]],
                   [int(i) for i in state["ids"]], int(state["next_id"]))
        if {len(t) for t in tensors} | {len(book.labels)} != {len(book.ids)}:
            raise ValueError("GRACE state: keys, values, radii, labels and ids differ in length")
        return book


class GRACE(Editor):
    """Codebook adaptor on one module, installed as a forward hook while the codebook is non-empty."""

    name = "grace"
    params_class = GRACEParams

    def __init__(self, lm: LoadedModel, params: GRACEParams) -> None:
        super().__init__(lm, params)
        self.layer = params.layers[0]
        if not 0 <= self.layer < lm.n_layers:
            raise ValueError(f"GRACE layer {self.layer} is out of range for {lm.name} ({lm.n_layers} layers)")
        self.module_path = lm.adapter.path(params.role, self.layer)
        self.codebook = Codebook.empty(device=lm.device)
        self._hook_handle: Any = None
        self._live: tuple[int, torch.Tensor] | None = None  # (row, value being trained)
        self._last_hits: torch.Tensor | None = None  # (hit, index) of the latest call while training
        self.skip_below = True  # reuse the output of the blocks below the adaptor while training (_train)

    # -- the adaptor ------------------------------------------------------------
    def _sync_hook(self) -> None:
        """Install the hook when the codebook has entries; remove it when it is empty."""
        if len(self.codebook) and self._hook_handle is None:
            self._hook_handle = attach_forward_hook(self.lm.model, self.module_path, self._adapt)
        elif not len(self.codebook) and self._hook_handle is not None:
            self._hook_handle.remove()
            self._hook_handle = None

    def _adapt(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        query = args[0]
        if not len(self.codebook):
            return None
        hit, index = self.codebook.hits(query.reshape(-1, query.shape[-1]))
        # rows x positions; OPT's MLP sees (batch·positions) x width, read as one row.
        shape = (-1, query.shape[-2]) if query.dim() > 2 else (1, -1)
        hit, index = hit.view(shape), index.view(shape)
        if self._live is not None:
            self._last_hits = (hit.detach(), index.detach())
        if not hit.any():
            return None
        values = self.codebook.values
        if self._live is not None:  # the entry being trained: differentiable, others fixed
            row, live = self._live
            values = torch.cat([values[:row], live[None], values[row + 1:]])
        flat = hidden.reshape(hit.shape[0], hit.shape[1], hidden.shape[-1])
        replaced = self._replace(flat, hit, index, values, query.dim() > 2).reshape(hidden.shape)
        return (replaced, *output[1:]) if isinstance(output, tuple) else replaced

    def _replace(self, hidden: torch.Tensor, hit: torch.Tensor, index: torch.Tensor,
                 values: torch.Tensor, by_row: bool) -> torch.Tensor:
        """``hidden`` (rows x positions x width) with codebook values at the positions the rule names."""
        if self.params.replacement == "replace_last":
            rows, cols = hit.nonzero(as_tuple=True)
            return hidden.index_put((rows, cols), values[index[rows, cols]].to(hidden.dtype))
        if not by_row:
            raise RuntimeError(f"grace: {self.params.replacement} needs a (batch, position) input at "
                               f"{self.module_path}; this module flattens them (use replace_last)")
        positions = torch.arange(hit.shape[1], device=hit.device)
        last = torch.where(hit, positions, -1).max(1).values  # the row's last matched position
        matched = last >= 0
        chosen = index.gather(1, last.clamp_min(0)[:, None])[:, 0]
        if self.params.replacement == "replace_prompt":  # positions before the matched token
            cover = matched[:, None] & (positions[None] < last[:, None])
        else:  # replace_all: the row's every position in this call
            cover = matched[:, None].expand_as(hit)
        return torch.where(cover[..., None], values[chosen][:, None].to(hidden.dtype), hidden)

    # -- state ------------------------------------------------------------------
    def reset(self) -> None:
        """Empty the codebook and remove the hook."""
        self.codebook = Codebook.empty(device=self.lm.device)
        self._sync_hook()

    def state_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "role": self.params.role, "codebook": self.codebook.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the codebook with a saved one (an empty mapping empties it)."""
        if not state:
            self.reset()
            return
        if state.get("layer") != self.layer or state.get("role") != self.params.role:
            raise ValueError(f"GRACE state is for {state.get('role')} at layer {state.get('layer')}, "
                             f"this editor adapts {self.params.role} at layer {self.layer}")
        self.codebook = Codebook.from_state(state["codebook"], self.lm.device)
        self._sync_hook()

    def _undo(self, book: Codebook, added: set[int], previous: dict[int, tuple]) -> None:
        if book is not self.codebook:  # emptied or replaced since (reset, load_state_dict): nothing to undo
            return
        book.remove(added & set(book.ids))
        for entry_id, entry in previous.items():
            if entry_id in book.ids:
                book.set_entry(entry_id, *entry)
        self._sync_hook()

    # -- the edit ---------------------------------------------------------------
    def _apply(self, requests: list[EditRequest], handle: EditHandle) -> None:
        for request in requests:  # one after another, each sees the codebook of the previous
            handle.info.append(self._apply_one(request, handle))

    def _initial_value(self, request: EditRequest, module: torch.nn.Module, query: torch.Tensor,
                       width: int) -> torch.Tensor:
        if self.params.val_init == "warm":  # the module's own output at the key token
            with torch.no_grad():
                return module(query[None].to(next(module.parameters()).dtype))[0].float()
        # Cold: U[0, 1) as the reference, from a generator seeded by the seed and the request,
        # so an edit does not depend on what was edited before it.
        text = f"{self.params.seed}\x00{request.prompt}\x00{request.target_new}".encode()
        seed = int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & (2**63 - 1)
        generator = torch.Generator().manual_seed(seed)
        return torch.rand(width, generator=generator).to(self.lm.device)

    def _grow(self, request: EditRequest, query: torch.Tensor, label: tuple[int, ...], module: torch.nn.Module,
              width: int, handle: EditHandle) -> tuple[int, str, float | None]:
        """Apply the codebook growth rule for ``query``; returns (entry id to train, action, distance)."""
        p, book = self.params, self.codebook
        added: set[int] = set()
        previous: dict[int, tuple] = {}
        handle.add_undo(lambda: self._undo(book, added, previous))
        distance = None
        if len(book):
            dist, where, _ = book.nearest(query[None])
            distance, nearest = float(dist[0]), int(where[0])
            nearest_id = book.ids[nearest]
        if distance is None or distance > p.eps + float(book.radii[nearest]):
            entry = book.add(query, self._initial_value(request, module, query, width), p.eps, label)
            added.add(entry)
            return entry, "added", distance
        previous[nearest_id] = book.entry(nearest_id)
        key, value, radius, old_label = previous[nearest_id]
        if old_label != label:
            if distance == 0.0:  # identical key: no split possible, the newer edit takes the entry
                book.set_entry(nearest_id, key, self._initial_value(request, module, query, width), radius, label)
                return nearest_id, "relabelled", distance
            book.set_entry(nearest_id, key, value, distance / 2 - 1e-5, old_label)
            entry = book.add(query, self._initial_value(request, module, query, width), distance / 2, label)
            added.add(entry)
            return entry, "split", distance
        if distance <= radius:
            return nearest_id, "covered", distance
        if p.eps_expand == "moving_average":
            key = 0.5 * key + 0.5 * query.to(key.dtype)
        book.set_entry(nearest_id, key, value, distance, label)
        return nearest_id, "expanded", distance

    def _apply_one(self, request: EditRequest, handle: EditHandle) -> dict[str, Any]:
        lm = self.lm
        context, target = encode_pair(lm.tokenizer, request.prompt, target_text(request.target_new))
        key_position = len(context) - 1
        module = get_module(lm.model, self.module_path)
        ids = torch.tensor([context + target[:-1]], device=lm.device)
        # The query depends only on earlier layers, so an installed adaptor does not change it.
        with torch.no_grad(), capture(lm.model, [self.module_path]) as store:
            lm.model(input_ids=ids[:, : len(context)], use_cache=False)
        module_in, module_out = store[self.module_path]
        query = module_in.reshape(-1, module_in.shape[-1])[key_position].detach().to(torch.float64)
        width = module_out.shape[-1]
        entry, action, distance = self._grow(request, query, tuple(target), module, width, handle)
        self._sync_hook()
        log.debug("grace: %s entry %d for %r (nearest key at %s)", action, entry, request.case_id, distance)
        losses = self._train(entry, ids, key_position, target)
        row = self.codebook.position(entry)
        if not torch.isfinite(self.codebook.values[row]).all():
            raise EditCollapseError(f"grace: the value trained for {request.case_id!r} is not finite")
        return {"case_id": request.case_id, "losses": losses, "action": action, "entry": entry,
                "distance": distance, "radius": float(self.codebook.radii[row]), "n_entries": len(self.codebook)}

    def _train(self, entry: int, ids: torch.Tensor, key_position: int, target: list[int]) -> tuple[float, ...]:
        """Adam on the entry's value: mean NLL of ``target`` after the prompt, adaptor active.

        Each step runs a :class:`~editkit.prefix_cache.PrefixCachedBatch`. With
        ``replace_last`` the tokens before the key token do not depend on the value (causal
        attention), so they run once into a key/value cache and every step runs only the key
        token and the target. The blocks below the adapted one do not depend on the value
        either: they run at the first step and their output is reused (the same logits, bit
        for bit; ``skip_below=False`` runs them at every step, for comparison).
        """
        p, book, model = self.params, self.codebook, self.lm.model
        row = book.position(entry)
        value = torch.nn.Parameter(book.values[row].clone())
        optimizer = torch.optim.Adam([value], lr=p.edit_lr)
        start = key_position if p.replacement == "replace_last" else 0
        try:  # one row, never padded; (its prefix uses the trained entry's initial value, if it matched)
            batch = PrefixCachedBatch(model, [ids[0].tolist()], [start], self.lm.tokenizer.pad_token_id,
                                      blocks=self.lm.adapter.blocks, first_block=self.layer if self.skip_below else 0)
        except SplitUnsupported as why:
            log.debug("grace: every token and block runs at every step: %s", why)
            batch, start = None, 0
        positions = torch.arange(len(target), device=ids.device) + key_position - start
        target_ids = torch.tensor(target, device=ids.device)
        losses: list[float] = []
        self._live = (row, value)
        try:
            with torch.enable_grad():
                for step in range(p.n_iter):
                    optimizer.zero_grad()
                    logits = batch() if batch is not None else model(input_ids=ids, use_cache=False).logits
                    loss = target_nll(logits[0, positions], target_ids)[0]
                    losses.append(loss.item())
                    if step == 0:
                        self._check_hit(row, key_position - start)
                    if p.early_stop_loss is not None and losses[-1] < p.early_stop_loss:
                        break
                    loss.backward()
                    optimizer.step()
        finally:
            self._live, self._last_hits = None, None
        with torch.no_grad():
            book.values[row] = value.detach()
        return tuple(losses)

    def _check_hit(self, row: int, key_position: int) -> None:
        hits = self._last_hits
        if hits is None or not bool(hits[0][0, key_position]) or int(hits[1][0, key_position]) != row:
            raise RuntimeError("grace: the edit prompt's key token does not select its codebook entry while "
                               "training (a radius below the numerical noise of the key?)")

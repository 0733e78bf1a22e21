"""The one table of architecture differences.

Editors and evaluators speak in *roles* and layer indices; this table maps a
``config.model_type`` to HuggingFace module paths and weight orientation. Adding
an architecture means adding one row and one tiny-model test.

Roles:
    ``blocks``      the list of transformer blocks (with a layer index: that block,
                    whose output is the residual stream after the layer),
    ``mlp``         a block's MLP module (its output is the MLP's contribution),
    ``mlp_in``      the MLP's input projection (up projection),
    ``mlp_out``     the MLP's output projection (what ROME and MEMIT edit);
                    its input is the post-activation key ``k`` of width d_mlp,
    ``attn_out``    the attention output projection,
    ``final_norm``  the norm before the unembedding,
    ``unembed``     the output (LM head) layer,
    ``embed``       the token embedding.

Weight layout: ``torch.nn.Linear`` stores ``out x in``; GPT-2's ``Conv1D`` stores
``in x out``. :meth:`Adapter.as_out_in` is the single place that turns a stored
weight into the ``out x in`` view editors compute with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .hooks import get_module

__all__ = ["Adapter", "ADAPTERS", "get_adapter", "UnsupportedModelError"]


class UnsupportedModelError(ValueError):
    """The model's ``config.model_type`` has no row in the adapter table."""


@dataclass(frozen=True)
class Adapter:
    model_type: str
    blocks: str
    mlp: str
    mlp_in: str
    mlp_out: str
    attn_out: str
    final_norm: str
    unembed: str
    embed: str
    layout: Literal["linear", "conv1d"] = "linear"

    def path(self, role: str, layer: int | None = None) -> str:
        """Module path of ``role`` (at ``layer`` for per-block roles)."""
        template = getattr(self, role, None)
        if not isinstance(template, str) or role in ("model_type", "layout"):
            raise KeyError(f"unknown role {role!r}")
        if role == "blocks" and layer is not None:
            return f"{template}.{layer}"
        if "{}" in template:
            if layer is None:
                raise ValueError(f"role {role!r} needs a layer index")
            return template.format(layer)
        return template

    def module(self, model: nn.Module, role: str, layer: int | None = None) -> nn.Module:
        return get_module(model, self.path(role, layer))

    def n_layers(self, model: nn.Module) -> int:
        return len(get_module(model, self.blocks))

    def weight(self, model: nn.Module, role: str, layer: int | None = None) -> nn.Parameter:
        return self.module(model, role, layer).weight

    def weight_path(self, role: str, layer: int | None = None) -> str:
        return f"{self.path(role, layer)}.weight"

    def as_out_in(self, weight: torch.Tensor) -> torch.Tensor:
        """View of a stored projection weight as ``out x in`` (no copy)."""
        return weight.T if self.layout == "conv1d" else weight

    def validate(self, model: nn.Module) -> None:
        """Check every role resolves on ``model``; raise naming the first that does not."""
        try:
            last = self.n_layers(model) - 1
        except KeyError as error:
            raise UnsupportedModelError(
                f"adapter {self.model_type!r}: blocks {self.blocks!r} not found in {type(model).__name__}"
            ) from error
        for role in ("mlp", "mlp_in", "mlp_out", "attn_out", "final_norm", "unembed", "embed"):
            for layer in (0, last):
                try:
                    self.module(model, role, layer)
                except KeyError as error:
                    raise UnsupportedModelError(
                        f"adapter {self.model_type!r}: role {role!r} -> {self.path(role, layer)!r} "
                        f"not found in {type(model).__name__}"
                    ) from error


def _decoder(model_type: str, prefix: str = "model", mlp_in: str = "up_proj") -> Adapter:
    """Row for the Llama-style decoder family (shared module names)."""
    block = f"{prefix}.layers.{{}}"
    return Adapter(
        model_type=model_type,
        blocks=f"{prefix}.layers",
        mlp=f"{block}.mlp",
        mlp_in=f"{block}.mlp.{mlp_in}",
        mlp_out=f"{block}.mlp.down_proj",
        attn_out=f"{block}.self_attn.o_proj",
        final_norm=f"{prefix}.norm",
        unembed="lm_head",
        embed=f"{prefix}.embed_tokens",
    )


ADAPTERS: dict[str, Adapter] = {
    "gpt2": Adapter(
        model_type="gpt2",
        blocks="transformer.h",
        mlp="transformer.h.{}.mlp",
        mlp_in="transformer.h.{}.mlp.c_fc",
        mlp_out="transformer.h.{}.mlp.c_proj",
        attn_out="transformer.h.{}.attn.c_proj",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        embed="transformer.wte",
        layout="conv1d",
    ),
    "gptj": Adapter(
        model_type="gptj",
        blocks="transformer.h",
        mlp="transformer.h.{}.mlp",
        mlp_in="transformer.h.{}.mlp.fc_in",
        mlp_out="transformer.h.{}.mlp.fc_out",
        attn_out="transformer.h.{}.attn.out_proj",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        embed="transformer.wte",
    ),
    "gpt_neox": Adapter(
        model_type="gpt_neox",
        blocks="gpt_neox.layers",
        mlp="gpt_neox.layers.{}.mlp",
        mlp_in="gpt_neox.layers.{}.mlp.dense_h_to_4h",
        mlp_out="gpt_neox.layers.{}.mlp.dense_4h_to_h",
        attn_out="gpt_neox.layers.{}.attention.dense",
        final_norm="gpt_neox.final_layer_norm",
        unembed="lm_head",  # "embed_out" before transformers 5
        embed="gpt_neox.embed_in",
    ),
    "opt": Adapter(
        model_type="opt",
        blocks="model.decoder.layers",
        # OPT has no MLP submodule: fc1 -> activation -> fc2 live on the block.
        mlp="model.decoder.layers.{}.fc2",
        mlp_in="model.decoder.layers.{}.fc1",
        mlp_out="model.decoder.layers.{}.fc2",
        attn_out="model.decoder.layers.{}.self_attn.out_proj",
        final_norm="model.decoder.final_layer_norm",
        unembed="lm_head",
        embed="model.decoder.embed_tokens",
    ),
    **{t: _decoder(t) for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo2")},
}


def get_adapter(model_type: str) -> Adapter:
    """The adapter row for ``model_type``; unknown types list the supported ones."""
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; supported types: {', '.join(sorted(ADAPTERS))}"
        ) from None

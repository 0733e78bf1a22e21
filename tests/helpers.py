"""Small helpers shared by the editor tests."""

from __future__ import annotations

import torch

from editkit.tokens import encode_pair, target_text


def target_logprob(lm, prompt: str, target: str) -> float:
    """Teacher-forced log P(target | prompt) in one pass over prompt + target."""
    context, continuation = encode_pair(lm.tokenizer, prompt, target_text(target))
    ids = torch.tensor([context + continuation], device=lm.device)
    with torch.no_grad():
        logp = lm.model(ids).logits.log_softmax(-1)[0]
    return sum(float(logp[len(context) - 1 + j, t]) for j, t in enumerate(continuation))


def snapshot(lm) -> dict[str, torch.Tensor]:
    """A detached copy of the model's whole state dict."""
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}

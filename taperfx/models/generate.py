"""KV-cached decoding: prefill the prompt once, then one token per step.

``step`` is anything with the reference models' calling convention
``step(input_ids, positions, past_key_values) -> (logits, present)``: an eager
model, a ``torch.compile``-d one, or an ExportedProgram's module.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from taperfx.errors import BadInput

__all__ = ["sample_next", "stream", "generate"]

Step = Callable[..., tuple[torch.Tensor, list]]


def sample_next(
    logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Next token per row of ``logits`` (B, V): greedy at ``temperature == 0``, else top-k sampling."""
    if temperature < 0:
        raise BadInput(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float()
    # Shifted to a maximum of 0 before the division, so that a tiny temperature sends the others to -inf
    # (sampling becomes greedy) instead of overflowing every logit to inf (NaN probabilities).
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    if top_k is not None:
        if top_k <= 0:
            raise BadInput(f"top_k must be positive, got {top_k}")
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def stream(
    step: Step,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next (B,) tokens one step at a time, feeding the cache back."""
    if max_new_tokens < 0:
        raise BadInput(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    b, t = input_ids.shape
    positions = torch.arange(t, device=input_ids.device).expand(b, t)
    logits, cache = step(input_ids, positions, None)
    for i in range(max_new_tokens):
        token = sample_next(logits[:, -1], temperature, top_k, generator)
        yield token
        if i + 1 == max_new_tokens:
            break
        positions = torch.full((b, 1), t + i, device=input_ids.device, dtype=torch.long)
        logits, cache = step(token[:, None], positions, cache)


def generate(step: Step, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """The prompt followed by ``max_new_tokens`` generated tokens, shape (B, T + new)."""
    new = list(stream(step, input_ids, max_new_tokens, **kwargs))
    return torch.cat([input_ids, *(tok[:, None] for tok in new)], dim=1) if new else input_ids

"""Autoregressive sampling with a KV cache."""

from __future__ import annotations

import torch
from torch import Tensor

from bigtx.model.transformer import Transformer


def _filter_logits(logits: Tensor, top_k: int | None, top_p: float | None) -> Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf; [V] -> [V]."""
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token once the tokens ranked above it already cover top_p; the first is always kept
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def generate(
    model: Transformer,
    prompt_ids: list[int] | Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    eos_id: int | None = None,
    seed: int | None = None,
) -> list[int]:
    """Continue ``prompt_ids`` by up to ``max_new_tokens`` tokens and return the new tokens only.

    ``greedy`` (or ``temperature == 0``) takes the argmax; otherwise samples from softmax(logits /
    temperature) restricted to the ``top_k`` most likely tokens and the ``top_p`` nucleus. Stops
    after ``eos_id``, which is not included in the result. ``seed`` makes sampling reproducible
    (a local generator; the global RNG is untouched); ``None`` uses the global RNG. The model runs
    in eval mode (no dropout) and its previous mode is restored. Raises ``ValueError`` for an empty
    prompt, a negative temperature, or a prompt plus ``max_new_tokens`` beyond ``max_seq_len``.
    """
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long).flatten()
    if prompt.numel() == 0:
        raise ValueError("generate: the prompt is empty; give at least one token")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    total = prompt.numel() + max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ValueError(
            f"generate: prompt ({prompt.numel()}) + max_new_tokens ({max_new_tokens}) exceeds "
            f"model.max_seq_len={model.cfg.max_seq_len}"
        )
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    greedy = greedy or temperature == 0

    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(total)
        logits = model(prompt.to(device)[None], cache=cache)[0, -1]
        new: list[int] = []
        for _ in range(max_new_tokens):
            if greedy:
                token = logits.argmax()
            else:
                scaled = _filter_logits(logits.float() / temperature, top_k, top_p)
                token = torch.multinomial(scaled.softmax(-1), 1, generator=gen)[0]
            # .item() is a device sync, needed anyway to test for eos
            next_id = int(token.item())
            if next_id == eos_id:
                break
            new.append(next_id)
            if len(new) < max_new_tokens:
                logits = model(token.view(1, 1), cache=cache)[0, -1]
    finally:
        model.train(was_training)
    return new

"""AdamW parameter groups: weight decay on matrices only."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from bigtx.config.spec import OptimSection

# Embedding tables are matrices too, but decaying them pulls rare tokens to zero; off unless asked.
_EMBEDDINGS = ("embed.weight", "pos_embed.weight")


def param_groups(
    model: nn.Module, optim: OptimSection, shape_of: Callable[[Tensor], Sequence[int]] = lambda p: p.shape
) -> list[dict[str, Any]]:
    """Two groups: decayed (2-D weights, embeddings only if ``optim.decay_embeddings``) and the rest.

    Norm weights, biases and embeddings (by default) get no weight decay. Each group carries a
    ``name`` so logs and tests can tell them apart. ``shape_of`` gives a parameter's full shape: a
    ZeRO-3 partitioned parameter's own tensor is a flat (often empty) partition, so training passes
    ``bigtx.zero3.full_shape``.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_embedding = name in _EMBEDDINGS
        if len(shape_of(param)) >= 2 and (not is_embedding or optim.decay_embeddings):
            decay.append(param)
        else:
            no_decay.append(param)
    return [
        {"name": "decay", "params": decay, "weight_decay": optim.weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]

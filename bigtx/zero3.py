"""Partitioned construction under ZeRO-3: the one module that reaches into DeepSpeed's ZeRO-3 internals.

Checked against DeepSpeed 0.19.8. Under ``zero.stage: 3`` bigtx builds the model inside
``deepspeed.zero.Init``: each module's parameters are partitioned over the ranks as soon as the
module is constructed, so no rank ever holds the whole model. A partitioned parameter's local
tensor is empty; its full shape is ``ds_shape``. Initial values are then written one parameter at
a time while it is gathered (``write_parameters``).

Tied embeddings need no ``register_external_parameter``: DeepSpeed registers a parameter that a
forward uses outside its own module on first access (``ZeROOrderedDict`` in parameter_offload.py);
the tied first step of tests/distributed/test_zero3.py equals ZeRO-2's without registering it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


def is_partitioned(p: Tensor) -> bool:
    """Whether ``p`` is a ZeRO-3 parameter (its local data is a partition, possibly empty)."""
    return hasattr(p, "ds_id") and hasattr(p, "ds_shape")


def full_shape(p: Tensor) -> torch.Size:
    """The shape of the whole parameter, also when only a partition is held here."""
    return p.ds_shape if is_partitioned(p) else p.shape


def partitioned_construction(ds_config: dict[str, Any], enabled: bool) -> contextlib.AbstractContextManager:
    """Context to construct the model in: ``deepspeed.zero.Init`` with the exact engine config when
    ``enabled`` (it reads the parameter dtype, the offload device and the ZeRO settings from it),
    else nothing."""
    if not enabled:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.Init(config_dict_or_path=ds_config)


@torch.no_grad()
def write_parameters(
    model: nn.Module, value_of: Callable[[str, torch.Size], Tensor], rank: int, world_size: int
) -> None:
    """Set every parameter of ``model`` to ``value_of(name, full_shape)``.

    Partitioned parameters are gathered one at a time; rank ``i % world_size`` computes the value of
    parameter ``i`` and DeepSpeed scatters it again, so the init work is spread over the ranks and at
    most one whole parameter is held at once. Tied parameters appear once (``named_parameters``).
    """
    import deepspeed

    for i, (name, p) in enumerate(model.named_parameters()):
        if not is_partitioned(p):
            p.copy_(value_of(name, p.shape))
            continue
        writer = i % world_size
        with deepspeed.zero.GatheredParameters(p, modifier_rank=writer):
            if rank == writer:
                p.data.copy_(value_of(name, p.ds_shape))

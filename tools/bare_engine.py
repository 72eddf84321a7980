"""A DeepSpeed engine of a bigtx spec without bigtx's trainer: the model built whole with its seeded
init, bigtx's parameter groups and the derived DeepSpeed config. Shared by the benchmark workers."""

from __future__ import annotations

from typing import Any


def deepspeed_engine(spec: Any, threads: int) -> Any:
    """Start gloo, set ``threads`` torch threads, and return the engine for ``spec`` (a ``RunSpec``)."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from bigtx.config.deepspeed_config import derive_deepspeed_config
    from bigtx.model import Transformer
    from bigtx.optim import param_groups

    deepspeed.init_distributed("gloo", verbose=False)
    deepspeed.utils.logger.setLevel("WARNING")
    torch.set_num_threads(threads)
    model = Transformer(spec.model)
    model.init_weights(spec.run.seed)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, spec.optim),
        config=derive_deepspeed_config(spec, dist.get_world_size()),
    )
    return engine

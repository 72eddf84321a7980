"""``open_source``: the weights at a path, whatever kind of directory it is; ``open_model``: them in a
``Transformer`` for inference."""

from __future__ import annotations

from pathlib import Path

import torch

from bigtx.checkpoint.store import resolve
from bigtx.export.consolidate import checkpoint_source, is_hf_dir, is_weights_dir, weights_dir_source
from bigtx.export.importer import hf_source
from bigtx.export.types import ExportError, WeightSource
from bigtx.model import Transformer


def open_source(path: str | Path, tag: str | None = None) -> WeightSource:
    """The weights at ``path``: a run directory (newest checkpoint, or ``tag``), a checkpoint
    directory (any ZeRO stage, or universal), a `bigtx export safetensors`/`bigtx import hf`
    directory, or a Hugging Face Llama/GPT-2 directory.

    Raises ``CheckpointError`` for a path or tag that names no checkpoint and for an incomplete or
    damaged one, ``ExportError`` for a tag given with a weights directory or a directory of no known kind.
    """
    path = Path(path)
    if path.is_dir() and not (path / "checkpoints").is_dir() and (is_weights_dir(path) or is_hf_dir(path)):
        if tag is not None:
            raise ExportError(f"--tag {tag}: {path} is a weights directory, not a run directory")
        return weights_dir_source(path) if is_weights_dir(path) else hf_source(path)
    return checkpoint_source(resolve(path, tag))


def open_model(source: WeightSource, dtype: torch.dtype, device: str | torch.device = "cpu") -> Transformer:
    """``source``'s weights in a ``Transformer`` of ``dtype`` on ``device``, in eval mode and with no
    parameter requiring gradients (nothing trains it: generation, a distillation teacher).

    Built on the meta device and then allocated once (no time spent on a random init); the weights are
    read one tensor at a time, so loading holds no second copy of the model.
    """
    cfg = source.spec.model.model_copy(update={"compile": False, "dropout": 0.0, "activation_checkpointing": "none"})
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=device)
    model.refill_buffers()  # non-persistent buffers are in no weights file
    model = model.to(dtype).eval().requires_grad_(False)
    state = model.state_dict()
    with torch.no_grad():
        for key, tensor in source.tensors():
            state[key].copy_(tensor)
    return model

"""``open_source``: the weights at a path, whatever kind of directory it is."""

from __future__ import annotations

from pathlib import Path

from bigtx.checkpoint.store import resolve
from bigtx.export.consolidate import checkpoint_source, is_hf_dir, is_weights_dir, weights_dir_source
from bigtx.export.importer import hf_source
from bigtx.export.types import ExportError, WeightSource


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

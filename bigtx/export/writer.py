"""Streaming safetensors writing, shared by `bigtx export hf|safetensors` and `bigtx import hf`.

``write_tensors`` converts and writes one tensor at a time: a shard is filled up to the size limit,
written and freed before the next one is started, so the peak memory is one shard (the whole model
only when it fits in one file) plus the tensor being converted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from bigtx.config.sizes import parse_size
from bigtx.export.types import DTYPES, ExportError, TensorJob
from bigtx.model.weights import INDEX_FILE, SINGLE_FILE


def export_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of ``--dtype``; ``ExportError`` for another name."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def max_shard_bytes(text: str) -> int:
    """``--max-shard-size`` in bytes (see ``bigtx.config.sizes``); must be positive."""
    try:
        size = parse_size(text)
    except ValueError as exc:
        raise ExportError(f"--max-shard-size: {exc}") from None
    if size <= 0:
        raise ExportError(f"--max-shard-size {text!r}: must be positive")
    return size


def plan_shards(jobs: Sequence[TensorJob], itemsize: int, max_shard_bytes: int) -> list[list[TensorJob]]:
    """Consecutive jobs packed into shards of at most ``max_shard_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[TensorJob]] = [[]]
    filled = 0
    for job in jobs:
        size = math.prod(job.shape) * itemsize
        if shards[-1] and filled + size > max_shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(job)
        filled += size
    return shards


def convert(job: TensorJob, dtype: torch.dtype) -> Tensor:
    """The tensor of ``job`` in ``dtype``; ``ExportError`` for a wrong shape or values fp16 cannot hold."""
    tensor = job.make()
    if tuple(tensor.shape) != job.shape:
        raise ExportError(f"{job.key}: produced shape {tuple(tensor.shape)}, expected {job.shape}")
    out = tensor.to(dtype).contiguous()
    if dtype == torch.float16 and not torch.isfinite(out).all() and torch.isfinite(tensor).all():
        raise ExportError(f"{job.key}: values beyond fp16's range (|x| > 65504); export as bf16 or fp32")
    return out


def write_tensors(jobs: Sequence[TensorJob], out: Path, dtype: torch.dtype, max_shard_bytes: int) -> list[str]:
    """Write ``jobs`` as ``model.safetensors`` or as shards plus ``model.safetensors.index.json``.

    Returns the file names written. Each shard is written as soon as it is full and freed.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = plan_shards(jobs, itemsize, max_shard_bytes)
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    weight_map: dict[str, str] = {}
    total = 0
    for name, shard in zip(names, shards):
        tensors: dict[str, Tensor] = {}
        for job in shard:
            tensors[job.key] = convert(job, dtype)
            total += tensors[job.key].numel() * itemsize
            weight_map[job.key] = name
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        del tensors  # the shard is on disk; free it before filling the next
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names

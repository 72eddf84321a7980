"""Streaming safetensors writing, and `bigtx export safetensors` (bigtx's own key names + spec.yaml).

``write_tensors`` converts and writes one tensor at a time: a shard is filled up to the size limit,
written and freed before the next one is started, so the peak memory is one shard (the whole model
only when it fits in one file) plus the tensor being converted. The output directory is built
under a temporary name next to ``out`` and renamed at the end, so an interrupted export never
leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file
from torch import Tensor

from bigtx.config import spec_to_dict
from bigtx.export.consolidate import ExportError, WeightSource, find_tokenizer_file
from bigtx.model.weights import INDEX_FILE, SINGLE_FILE, SPEC_FILE

log = logging.getLogger("bigtx")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_size(text: str) -> int:
    """Bytes in ``5GB``, ``200KB``, ``1.5GiB`` or ``1000000`` (decimal units, as Hugging Face's)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise ExportError(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB, 200KB or 2GiB")
    size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size <= 0:
        raise ExportError(f"--max-shard-size {text!r}: must be positive")
    return size


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: its key, shape and a function that produces it (in any float dtype)."""

    key: str
    shape: tuple[int, ...]
    make: Callable[[], Tensor]


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


def _convert(job: TensorJob, dtype: torch.dtype) -> Tensor:
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
            tensors[job.key] = _convert(job, dtype)
            total += tensors[job.key].numel() * itemsize
            weight_map[job.key] = name
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        del tensors  # the shard is on disk; free it before filling the next
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names


@contextmanager
def staged_output(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary directory beside ``out`` that becomes ``out`` when the block succeeds."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ExportError(f"--out {out}: exists and is not empty; choose another directory or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # mkdtemp and the safetensors writer create owner-only files; exports are meant to be shared
    for f in tmp.iterdir():
        os.chmod(f, 0o644)
    os.chmod(tmp, 0o755)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        os.replace(tmp, out)


def write_spec(source: WeightSource, out: Path, final_out: Path, tokenizer: str | None) -> None:
    """spec.yaml: the source's run spec, with ``model.init_from`` pointing at the weights."""
    spec = spec_to_dict(source.spec)
    spec["model"]["init_from"] = str(final_out.resolve())
    if tokenizer is not None:
        spec["data"]["tokenizer"] = tokenizer
    header = (
        f"# Weights exported from {source.path} by bigtx. model.init_from points at them, so\n"
        f"#   bigtx train {final_out / SPEC_FILE} --set run.dir=NEW_RUN_DIR --set data.train=...\n"
        "# starts a new run from these weights.\n"
    )
    (out / SPEC_FILE).write_text(header + yaml.safe_dump(spec, sort_keys=False))


def copy_tokenizer(source: WeightSource, out: Path, final_out: Path) -> str | None:
    """Copy a tokenizer.json the spec names (or the source directory holds) into ``out``.

    Returns the spec value for ``data.tokenizer`` afterwards: the copy's path, ``byte``, or None
    when no tokenizer file was found.
    """
    if source.spec.data.tokenizer == "byte":
        return "byte"
    found = find_tokenizer_file(source.spec.data.tokenizer, source.path)
    if found is None:
        log.warning("data.tokenizer %s not found; the export has no tokenizer.json", source.spec.data.tokenizer)
        return None
    shutil.copy2(found, out / "tokenizer.json")
    return str((final_out / "tokenizer.json").resolve())


def export_safetensors(
    source: WeightSource, out: Path, dtype: str = "fp32", max_shard_size: str = "5GB", overwrite: bool = False
) -> list[str]:
    """Write ``source``'s weights under bigtx key names, ``spec.yaml`` and the tokenizer to ``out``.

    The result loads with ``bigtx.model.weights.load_weights`` (``model.init_from``) and
    ``bigtx generate``. Returns the names of the files written.
    """
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    shard_bytes = parse_size(max_shard_size)
    jobs = [TensorJob(key, shape, lambda key=key: source.read(key)) for key, shape in source.shapes.items()]
    with staged_output(out, overwrite) as tmp:
        written = write_tensors(jobs, tmp, DTYPES[dtype], shard_bytes)
        tokenizer = copy_tokenizer(source, tmp, out)
        write_spec(source, tmp, out, tokenizer)
    return written

"""Read the full-precision weights of a bigtx model, one tensor at a time.

A ``WeightSource`` names every tensor of a ``Transformer`` state dict with its shape and reads one
tensor on request. This module reads DeepSpeed checkpoints of any ZeRO stage, universal checkpoints
and `bigtx export safetensors` directories; ``bigtx.export.importer`` reads Hugging Face
directories, and ``bigtx.export.sources.open_source`` picks the right reader for a path.

What DeepSpeed writes, and where the fp32 master weights are (DeepSpeed 0.16-0.19):

- ZeRO-1/2: each rank's ``*_optim_states.pt`` holds its partition of every parameter group's
  flat fp32 vector (``single_partition_of_fp32_groups``); ``*_model_states.pt`` holds the
  parameter names and shapes per group in flattening order (``param_shapes``). DeepSpeed's
  ``zero_to_fp32`` parses both; it then concatenates each whole group in memory, so instead each
  parameter is gathered from the partitions it spans (``_zero12_reader``).
- ZeRO-3: ``fp32_flat_groups`` per rank, each parameter split evenly over the ranks; DeepSpeed's
  lazy mode (``get_fp32_state_dict_from_zero_checkpoint(..., lazy_mode=True)``) gathers one
  parameter at a time already.
- stage 0 with bf16/fp16: DeepSpeed wraps the optimizer in ``FP16_Optimizer`` or, for torch's
  AdamW (what bigtx uses on CPUs), ``FP16_UnfusedOptimizer`` (also for bf16, "DDP_BFLOAT16"); they
  keep the unpartitioned fp32 masters in rank 0's ``mp_rank_00_model_states.pt``, one flat vector
  per parameter group (``optimizer.fp32_groups_flat``) or one tensor per parameter
  (``optimizer.fp32_groups``), with no parameter names. The order is that of the parameter groups
  bigtx handed to DeepSpeed
  (``param_groups`` in ``bigtx_meta.json``, recorded by the trainer); every master weight is checked
  against the bf16/fp16 module weight it must round to.
- stage 0 with fp32: no wrapper; the module weights in ``mp_rank_00_model_states.pt`` are the
  weights the optimizer updates.
- universal (``bigtx ckpt universal`` / ``checkpoint.to_universal``): ``zero/<name>/fp32.pt``.

Checkpoint files are opened with ``mmap=True``: what is read is paged in on demand and nothing
else (optimizer moments) is loaded. Universal ``fp32.pt`` files hold tensors only and are loaded with
``weights_only=True``, which refuses any other pickled object. DeepSpeed's own engine files
(``*_model_states.pt``, ``*_optim_states.pt``) pickle Python objects of DeepSpeed's and can only be
unpickled in full: opening such a checkpoint runs code from it, so open only checkpoints you trust.
"""

from __future__ import annotations

import contextlib
import json
import math
import pickle
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from bigtx.checkpoint.store import (
    COMPLETE,
    META,
    CheckpointError,
    read_meta,
    verify,
)
from bigtx.config import RunSpec, SpecError, load_spec, validate_spec
from bigtx.config.spec import ModelSection
from bigtx.export.types import ExportError, WeightSource, expected_shapes
from bigtx.model.weights import INDEX_FILE, SINGLE_FILE, SPEC_FILE, tensor_files


def ordered_like_model(cfg: ModelSection, found: dict[str, tuple[int, ...]], where: Path) -> dict[str, tuple[int, ...]]:
    """``found`` in the model's key order; raises ``CheckpointError`` unless keys and shapes are the model's."""
    expected = expected_shapes(cfg)
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{k} {found[k]} != {expected[k]}" for k in expected if k in found and tuple(found[k]) != expected[k]]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{where}: the weights do not match the model section of its spec: "
            f"missing {missing[:6] or 'none'}, unexpected {unexpected[:6] or 'none'}, shapes {wrong[:6] or 'ok'}"
        )
    return {k: expected[k] for k in expected}


# --------------------------------------------------------------------------------------------
# Checking the checkpoint (finding it is bigtx.checkpoint.resolve).


def check_checkpoint(path: Path) -> dict[str, Any]:
    """Refuse an incomplete or damaged checkpoint (``bigtx.checkpoint.verify``); returns its meta."""
    if not (path / COMPLETE).is_file():
        if not (path / META).is_file() and not any(path.glob("*model_states.pt")):
            raise ExportError(
                f"{path}: not a bigtx run directory, checkpoint, `bigtx export safetensors` directory "
                "or Hugging Face directory"
            )
        raise CheckpointError(
            f"{path}: incomplete checkpoint (no {COMPLETE}); it was interrupted while saving. "
            "Export another one (--tag)"
        )
    problems = verify(path)
    if problems:
        raise CheckpointError(f"{path} is damaged:\n  " + "\n  ".join(problems))
    if not (path / META).is_file():
        raise CheckpointError(f"{path}: no {META}; not a bigtx checkpoint")
    return json.loads((path / META).read_text())


def spec_of(meta: dict[str, Any], where: Path) -> RunSpec:
    try:
        return validate_spec(meta["spec"], str(where / META), saved=True)
    except (KeyError, SpecError) as exc:
        raise CheckpointError(f"{where / META}: the saved run spec is unreadable ({exc})") from None


# --------------------------------------------------------------------------------------------
# Readers, one per checkpoint layout. Each returns (shapes found, read function).

Reader = tuple[dict[str, tuple[int, ...]], Callable[[str], Tensor]]


@contextlib.contextmanager
def _deepspeed_quiet() -> Iterator[None]:
    """DeepSpeed's zero_to_fp32 prints progress on stdout; send it to stderr with its progress bars."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _load_deepspeed_pickle(file: Path) -> Any:
    """One of DeepSpeed's engine files, unpickled in full.

    These are DeepSpeed's pickles (optimizer wrappers, enums, argparse namespaces), which
    ``weights_only=True`` refuses; unpickling them can run code, as any pickle can.
    """
    try:
        return torch.load(file, map_location="cpu", mmap=True, weights_only=False)
    except Exception as exc:  # a truncated or foreign file: zip, pickle or mmap errors
        raise CheckpointError(f"{file}: cannot be read ({type(exc).__name__}: {exc})") from None


def _load_tensors(file: Path) -> Any:
    """A file of tensors (and plain containers and numbers), loaded with ``weights_only=True``.

    Any other pickled object is refused without being built, so no code in the file runs.
    """
    try:
        return torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message is a page of advice (including "load it with weights_only=False"); keep what it refused
        refused = re.search(r"WeightsUnpickler error: (.*?)(?: was not an allowed global|\n|$)", str(exc))
        raise CheckpointError(
            f"{file}: holds pickled Python objects, not only tensors ({refused.group(1) if refused else exc}); "
            "bigtx loads universal checkpoints with weights_only=True and does not unpickle them. "
            "Recreate the universal checkpoint with `bigtx ckpt universal` from a checkpoint you trust"
        ) from None
    except Exception as exc:  # a truncated or foreign file: zip or mmap errors
        raise CheckpointError(f"{file}: cannot be read ({type(exc).__name__}: {exc})") from None


def _zero12_reader(path: Path) -> Reader:
    from deepspeed.utils import zero_to_fp32 as z

    # zero_to_fp32 unpickles DeepSpeed's own *_model_states.pt and *_optim_states.pt in full
    # (weights_only=False): they are DeepSpeed's pickles, not plain tensors
    with _deepspeed_quiet():
        states = z.parse_model_states(z.get_model_state_files(str(path)))
        stage, world, partitions, paddings = z.parse_optim_states(z.get_optim_files(str(path)), str(path))
    if int(stage) > 2:
        raise CheckpointError(f"{path}: expected a ZeRO-1/2 checkpoint, DeepSpeed says stage {int(stage)}")
    where: dict[str, tuple[int, int, tuple[int, ...]]] = {}
    for group, group_shapes in enumerate(states[0].param_shapes):
        offset = 0
        for i, (name, shape) in enumerate(group_shapes.items()):
            where[name] = (group, offset, tuple(shape))
            offset += math.prod(shape) + (paddings[group][i] if paddings is not None else 0)
        available = sum(rank_parts[group].numel() for rank_parts in partitions)
        if offset > available:
            raise CheckpointError(f"{path}: group {group} needs {offset} values, the partitions hold {available}")

    def read(name: str) -> Tensor:
        group, offset, shape = where[name]
        end, start_of_rank, pieces = offset + math.prod(shape), 0, []
        # the group's flat vector is the ranks' partitions end to end; take the part of each this
        # parameter overlaps (the whole vector is never built)
        for rank_parts in partitions:
            part = rank_parts[group]
            lo, hi = max(offset, start_of_rank), min(end, start_of_rank + part.numel())
            if lo < hi:
                pieces.append(part[lo - start_of_rank : hi - start_of_rank])
            start_of_rank += part.numel()
        return (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).view(shape)

    return {name: shape for name, (_, _, shape) in where.items()}, read


def _zero3_reader(path: Path) -> Reader:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # DeepSpeed's pickles, unpickled in full by zero_to_fp32 (see _zero12_reader)
    with _deepspeed_quiet():
        lazy = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name, lazy_mode=True)
    return {k: tuple(v.shape) for k, v in lazy.items()}, lambda name: lazy[name].contiguous()


def _stage0_reader(path: Path) -> Reader:
    state = _load_deepspeed_pickle(path / "mp_rank_00_model_states.pt")
    module: dict[str, Tensor] = state["module"]
    optimizer = state.get("optimizer") or {}
    flats, per_param = optimizer.get("fp32_groups_flat"), optimizer.get("fp32_groups")
    shapes = {k: tuple(v.shape) for k, v in module.items()}
    if flats is None and per_param is None:
        wrong = sorted({str(v.dtype) for v in module.values()} - {"torch.float32"})
        if wrong:
            raise CheckpointError(f"{path}: stage-0 checkpoint with {wrong} weights and no fp32 master weights")
        return shapes, lambda name: module[name]

    # DeepSpeed's FP16 optimizers keep the fp32 masters per parameter group, in group order, either
    # one flat tensor per group (fused optimizer) or one tensor per parameter (torch's AdamW); the
    # trainer records which parameters each group holds in bigtx_meta.json.
    groups = read_meta(path).get("param_groups")
    if groups is None:
        raise CheckpointError(f"{path}: {META} does not list the optimizer's parameter groups (older bigtx?)")
    masters: dict[str, Tensor] = {}
    for group, group_names in enumerate(groups):
        if per_param is not None:
            if len(per_param[group]) != len(group_names):
                raise CheckpointError(
                    f"{path}: fp32 master group {group} has {len(per_param[group])} tensors, "
                    f"{META} lists {len(group_names)} parameters"
                )
            masters.update(zip(group_names, per_param[group]))
            continue
        offset, flat = 0, flats[group]
        for name in group_names:
            size = math.prod(shapes[name])
            masters[name] = flat[offset : offset + size].view(shapes[name])
            offset += size
        if offset != flat.numel():
            raise CheckpointError(
                f"{path}: fp32 master group {group} holds {flat.numel()} values, its parameters {offset}"
            )

    def read(name: str) -> Tensor:
        master, low = masters[name].view(shapes[name]), module[name]
        if not torch.equal(master.to(low.dtype), low):
            raise CheckpointError(f"{path}: fp32 master weight of {name} does not round to its {low.dtype} weight")
        return master

    return shapes, read


def _universal_reader(path: Path, cfg: ModelSection) -> Reader:
    zero = path / "zero"
    if not zero.is_dir():
        raise CheckpointError(f"{path}: universal checkpoint without its zero/ directory")
    # converted from ZeRO-1/2, fp32.pt is {"param": tensor, ...}; from ZeRO-3 it is the flat tensor
    expected = expected_shapes(cfg)
    names = sorted(p.name for p in zero.iterdir() if (p / "fp32.pt").is_file())

    def read(name: str) -> Tensor:
        file = zero / name / "fp32.pt"
        saved = _load_tensors(file)
        param = saved.get("param") if isinstance(saved, dict) else saved
        if not isinstance(param, Tensor):
            raise CheckpointError(
                f"{file}: expected a tensor or a dict with a 'param' tensor, found {type(saved).__name__}"
                + (f" with keys {sorted(map(str, saved))[:6]}" if isinstance(saved, dict) else "")
            )
        if param.numel() != math.prod(expected[name]):
            raise CheckpointError(f"{zero / name}: {param.numel()} values, the model's {name} has {expected[name]}")
        return param.view(expected[name])

    return {name: expected.get(name, ()) for name in names}, read


def checkpoint_source(path: Path) -> WeightSource:
    """The fp32 master weights of the checkpoint directory ``path`` (any ZeRO stage, or universal).

    Raises ``CheckpointError`` for an incomplete or damaged checkpoint or weights that do not fit its spec.
    """
    meta = check_checkpoint(path)
    spec = spec_of(meta, path)
    stage = meta.get("zero_stage", spec.zero.stage)
    if (path / "zero").is_dir():
        kind, (found, read) = "universal checkpoint", _universal_reader(path, spec.model)
    elif stage == 3:
        kind, (found, read) = "ZeRO-3 checkpoint", _zero3_reader(path)
    elif stage in (1, 2):
        kind, (found, read) = f"ZeRO-{stage} checkpoint", _zero12_reader(path)
    else:
        kind, (found, read) = f"stage-0 {spec.precision} checkpoint", _stage0_reader(path)
    shapes = ordered_like_model(spec.model, found, path)
    return WeightSource(path=path, spec=spec, kind=kind, shapes=shapes, read=read, meta=meta)


def weights_dir_source(path: Path) -> WeightSource:
    """The weights of a `bigtx export safetensors`/`bigtx import hf` directory, as stored."""
    spec = load_spec(str(path / SPEC_FILE), saved=True)
    files = tensor_files(path)
    found = {}
    for file in sorted(set(files.values())):
        with safe_open(file, framework="pt") as f:
            found.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    shapes = ordered_like_model(spec.model, found, path)

    def read(name: str) -> Tensor:
        with safe_open(files[name], framework="pt") as f:
            return f.get_tensor(name)

    return WeightSource(path=path, spec=spec, kind="bigtx weights directory", shapes=shapes, read=read)


def find_tokenizer_file(tokenizer: str, near: Path) -> Path | None:
    """The tokenizer.json meant by ``data.tokenizer`` (not ``byte``) for weights at ``near``.

    Looked for in order: a tokenizer.json beside the weights (exports carry a copy), the path as
    given (relative to the working directory, as the trainer reads it), and relative to the run
    directory above a checkpoint. None when none exists.
    """
    candidates = [near / "tokenizer.json", Path(tokenizer)]
    candidates += [parent / tokenizer for parent in near.parents[:4]] if not Path(tokenizer).is_absolute() else []
    return next((c for c in candidates if c.is_file()), None)


def is_weights_dir(path: Path) -> bool:
    return (path / SPEC_FILE).is_file() and ((path / SINGLE_FILE).is_file() or (path / INDEX_FILE).is_file())


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / SPEC_FILE).is_file()

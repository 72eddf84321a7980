"""Load consolidated bigtx weights (a `bigtx export safetensors` or `bigtx import hf` directory).

Such a directory holds ``spec.yaml`` (a run spec whose model section describes the weights) and
either ``model.safetensors`` or shards listed in ``model.safetensors.index.json``, keyed by bigtx
state-dict names. Tensors are read one at a time, so loading needs no second copy of the model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from bigtx.config.loading import load_spec
from bigtx.config.spec import ModelSection

log = logging.getLogger("bigtx")

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SPEC_FILE = "spec.yaml"

# Fields that change what the weights compute without changing any shape: loading into a model that
# differs in one of them would run silently wrong, so it is refused.
_MUST_MATCH = ("position", "norm", "norm_placement", "mlp", "n_heads", "qk_norm", "bias", "tie_embeddings")
# Fields a continued run may change on purpose (longer context, another RoPE base); warned about.
_MAY_DIFFER = ("rope_theta", "norm_eps", "max_seq_len")


def tensor_files(path: str | Path) -> dict[str, Path]:
    """``key -> safetensors file`` for a weights directory (single file or sharded with an index).

    Raises ``FileNotFoundError`` when ``path`` holds neither.
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        with safe_open(path, framework="pt") as f:
            return dict.fromkeys(f.keys(), path)
    if (path / INDEX_FILE).is_file():
        weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        return {key: path / name for key, name in weight_map.items()}
    if (path / SINGLE_FILE).is_file():
        with safe_open(path / SINGLE_FILE, framework="pt") as f:
            return dict.fromkeys(f.keys(), path / SINGLE_FILE)
    raise FileNotFoundError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}; not a bigtx weights directory")


def read_model_section(path: str | Path) -> ModelSection | None:
    """The model section of ``path/spec.yaml``, or None when the directory has no spec."""
    spec_file = Path(path) / SPEC_FILE
    if not spec_file.is_file():
        return None
    return load_spec(str(spec_file), saved=True).model


def _check_architecture(saved: ModelSection, cfg: ModelSection, path: Path) -> None:
    wrong = [
        f"model.{f}: weights have {getattr(saved, f)!r}, the model {getattr(cfg, f)!r}"
        for f in _MUST_MATCH
        if getattr(saved, f) != getattr(cfg, f)
    ]
    if saved.kv_heads != cfg.kv_heads:
        wrong.append(f"model.n_kv_heads: weights have {saved.kv_heads}, the model {cfg.kv_heads}")
    if wrong:
        raise ValueError(f"model.init_from: {path} was trained with another architecture:\n  " + "\n  ".join(wrong))
    for f in _MAY_DIFFER:
        if getattr(saved, f) != getattr(cfg, f):
            log.warning("model.init_from: %s has model.%s=%r, this run %r", path, f, getattr(saved, f), getattr(cfg, f))


def weight_reader(path: str | Path, cfg: ModelSection | None, shapes: Mapping[str, Sequence[int]]) -> WeightReader:
    """Check the weights in ``path`` against a model and return a reader of its tensors by name.

    ``shapes`` maps every state-dict key of the model to its full shape (under ZeRO-3 the partition
    metadata's, see ``bigtx.zero3.full_shape``). Every key must be present with that shape, and no
    other key may be; when ``path/spec.yaml`` exists its model section must describe the same
    architecture as ``cfg``. All of this is checked before any tensor is read. Raises ``ValueError``
    naming what does not fit, ``FileNotFoundError`` for a wrong path.
    """
    path = Path(path)
    files = tensor_files(path)
    saved = read_model_section(path) if path.is_dir() else None
    if saved is not None and cfg is not None:
        _check_architecture(saved, cfg, path)
    missing = sorted(set(shapes) - set(files))
    unexpected = sorted(set(files) - set(shapes))
    if missing or unexpected:
        raise ValueError(
            f"model.init_from: {path} does not fit the model: "
            f"missing {missing[:8] or 'none'}, unexpected {unexpected[:8] or 'none'}"
        )
    by_file: dict[Path, list[str]] = {}
    for key in shapes:
        by_file.setdefault(files[key], []).append(key)
    for file, keys in by_file.items():
        with safe_open(file, framework="pt") as f:
            for key in keys:
                shape = tuple(f.get_slice(key).get_shape())
                if shape != tuple(shapes[key]):
                    raise ValueError(
                        f"model.init_from: {key} has shape {shape} in {file}, the model {tuple(shapes[key])}"
                    )
    return WeightReader(files)


class WeightReader:
    """Reads one tensor at a time (``reader(key)``), so loading never holds a second copy of the model."""

    def __init__(self, files: Mapping[str, Path]) -> None:
        self._files = files

    def __call__(self, key: str, shape: Sequence[int] | None = None) -> torch.Tensor:
        """The whole tensor ``key`` as stored; ``shape`` (already checked) is accepted so the reader can
        stand in for ``Transformer.initial_value`` in ``bigtx.zero3.write_parameters``."""
        with safe_open(self._files[key], framework="pt") as f:
            return f.get_tensor(key)


@torch.no_grad()
def load_weights(model: nn.Module, path: str | Path) -> None:
    """Copy the weights in ``path`` into ``model`` (a ``Transformer``, not partitioned), casting to its
    dtype; checked as ``weight_reader`` describes."""
    targets = model.state_dict(keep_vars=True)
    cfg = getattr(model, "cfg", None)
    read = weight_reader(path, cfg if isinstance(cfg, ModelSection) else None, {k: t.shape for k, t in targets.items()})
    for key, target in targets.items():
        target.copy_(read(key).to(target.dtype))

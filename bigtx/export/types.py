"""What the modules of bigtx.export share: the error, a source of weights, a tensor to write, dtypes.

A leaf: it imports nothing else from bigtx.export, so every other module may import it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bigtx.config import RunSpec
from bigtx.config.spec import ModelSection
from bigtx.model import Transformer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ExportError(ValueError):
    """A path, option or model that cannot be exported or imported; the message says what to do."""


@dataclass
class WeightSource:
    """The tensors of one bigtx model, read one at a time.

    ``shapes`` lists every state-dict key of ``Transformer(spec.model)`` in its order; ``read(key)``
    returns that tensor (fp32 for checkpoints; as stored for weight directories).
    """

    path: Path
    spec: RunSpec
    kind: str
    shapes: dict[str, tuple[int, ...]]
    read: Callable[[str], Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def tensors(self) -> Iterator[tuple[str, Tensor]]:
        for key in self.shapes:
            yield key, self.read(key)

    def state_dict(self) -> dict[str, Tensor]:
        """All tensors at once (for small models and tests)."""
        return dict(self.tensors())

    def describe(self) -> str:
        step = f" step {self.meta['step']}" if "step" in self.meta else ""
        return f"{self.path} ({self.kind}{step}, {self.spec.model.num_params():,} parameters)"


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: its key, shape and a function that produces it (in any float dtype)."""

    key: str
    shape: tuple[int, ...]
    make: Callable[[], Tensor]


def expected_shapes(cfg: ModelSection) -> dict[str, tuple[int, ...]]:
    """State-dict keys and shapes of ``Transformer(cfg)``, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = Transformer(cfg.model_copy(update={"compile": False}))
    return {key: tuple(t.shape) for key, t in model.state_dict().items()}

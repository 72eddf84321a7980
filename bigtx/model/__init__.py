"""The decoder-only Transformer (single device, plain PyTorch) and KV-cache generation."""

from bigtx.model.generate import generate
from bigtx.model.layers import KVCache
from bigtx.model.transformer import Transformer

__all__ = ["KVCache", "Transformer", "generate"]

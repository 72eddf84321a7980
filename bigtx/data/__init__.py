"""Data: tokenizers, the shard builder, and the streaming loader with exact resume.

``load_tokenizer``, ``check_data`` and ``DataError`` import without torch; ``build_loader``,
``build_val_loaders`` and ``TokenLoader`` pull in torch on first use.
"""

from bigtx.data.errors import DataError
from bigtx.data.sources import check_data
from bigtx.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
    "ByteTokenizer",
    "DataError",
    "HFTokenizer",
    "TokenLoader",
    "build_loader",
    "build_val_loaders",
    "check_data",
    "load_tokenizer",
]


def __getattr__(name: str):
    if name in ("build_loader", "build_val_loaders", "TokenLoader"):
        from bigtx.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'bigtx.data' has no attribute {name!r}")

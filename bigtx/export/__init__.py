"""Consolidated weights out of DeepSpeed checkpoints: Hugging Face export, bigtx safetensors, import.

Depends on ``bigtx.model``, ``bigtx.checkpoint`` and ``bigtx.config``; ``transformers`` is imported
only by the functions that write or load Hugging Face directories.

Modules, each importing only those before it: ``types`` (shared types) and ``weight_map`` (key
tables); ``writer`` (safetensors shards), ``output`` (the --out directory and its marker) and
``consolidate`` (checkpoint and weights-directory readers); ``safetensors_export``; ``importer``
(Hugging Face -> bigtx) and ``hf`` (bigtx -> Hugging Face); ``sources`` (``open_source``, ``open_model``).
"""

from bigtx.export.hf import export_hf, hf_weight_map, verify_hf_export
from bigtx.export.importer import hf_source, import_hf
from bigtx.export.safetensors_export import export_safetensors
from bigtx.export.sources import open_model, open_source
from bigtx.export.types import ExportError, WeightSource

__all__ = [
    "ExportError",
    "WeightSource",
    "export_hf",
    "export_safetensors",
    "hf_source",
    "hf_weight_map",
    "import_hf",
    "open_model",
    "open_source",
    "verify_hf_export",
]

"""Consolidated weights out of DeepSpeed checkpoints: Hugging Face export, bigtx safetensors, import.

Depends on ``bigtx.model``, ``bigtx.checkpoint`` and ``bigtx.config``; ``transformers`` is imported
only by the functions that write or load Hugging Face directories.
"""

from bigtx.export.consolidate import ExportError, WeightSource, open_source
from bigtx.export.hf import export_hf, hf_weight_map, verify_hf_export
from bigtx.export.importer import hf_source, import_hf
from bigtx.export.safetensors_export import export_safetensors

__all__ = [
    "ExportError",
    "WeightSource",
    "export_hf",
    "export_safetensors",
    "hf_source",
    "hf_weight_map",
    "import_hf",
    "open_source",
    "verify_hf_export",
]

"""`bigtx export safetensors`: a model's weights under bigtx's own key names, plus spec.yaml and its tokenizer.

The result loads with ``bigtx.model.weights.load_weights`` (``model.init_from``) and `bigtx generate`;
`bigtx import hf` writes the same kind of directory.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import yaml

from bigtx.config import spec_to_dict
from bigtx.export.consolidate import find_tokenizer_file
from bigtx.export.output import staged_output
from bigtx.export.types import TensorJob, WeightSource
from bigtx.export.writer import export_dtype, max_shard_bytes, write_tensors
from bigtx.model.weights import SPEC_FILE

log = logging.getLogger("bigtx")


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

    ``out`` must be new, empty or (with ``overwrite``) an earlier export (``bigtx.export.output``).
    Returns the names of the weight files written.
    """
    torch_dtype, shard_bytes = export_dtype(dtype), max_shard_bytes(max_shard_size)
    jobs = [TensorJob(key, shape, lambda key=key: source.read(key)) for key, shape in source.shapes.items()]
    with staged_output(out, overwrite, "safetensors", source.path) as tmp:
        written = write_tensors(jobs, tmp, torch_dtype, shard_bytes)
        tokenizer = copy_tokenizer(source, tmp, out)
        write_spec(source, tmp, out, tokenizer)
    return written

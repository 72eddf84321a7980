"""The run spec: pydantic models, loading with overrides, and the derived DeepSpeed config."""

from bigtx.config.loading import (
    SpecError,
    add_spec_args,
    load_spec,
    preset_names,
    spec_hash,
    spec_to_dict,
    validate_spec,
)
from bigtx.config.spec import DataSection, DataSource, DistillSection, ModelSection, RunSpec

__all__ = [
    "DataSection",
    "DataSource",
    "DistillSection",
    "ModelSection",
    "RunSpec",
    "SpecError",
    "add_spec_args",
    "load_spec",
    "preset_names",
    "spec_hash",
    "spec_to_dict",
    "validate_spec",
]

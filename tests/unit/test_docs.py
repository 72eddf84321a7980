"""The README's spec tables are generated from the models and must not drift."""

from __future__ import annotations

from pathlib import Path

from bigtx.config.docs import replace_block, spec_tables_markdown
from bigtx.config.spec import RunSpec

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_spec_tables_are_current() -> None:
    text = README.read_text()
    assert replace_block(text, spec_tables_markdown()) == text, "run: python tools/spec_tables.py"


def test_every_field_is_in_the_tables() -> None:
    tables = spec_tables_markdown()
    for section, field in RunSpec.model_fields.items():
        model = field.annotation
        for name in getattr(model, "model_fields", {}):
            assert f"`{section}.{name}`" in tables

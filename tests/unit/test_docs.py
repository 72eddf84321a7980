"""The README's spec tables are generated from the models and must not drift."""

from __future__ import annotations

import re
from pathlib import Path

from bigtx.config import load_spec, spec_to_dict
from bigtx.config.docs import BEGIN, END, replace_block, spec_tables_markdown

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_spec_tables_are_current() -> None:
    text = README.read_text()
    assert replace_block(text, spec_tables_markdown()) == text, "run: python tools/spec_tables.py"


def _leaves(data: dict, prefix: str = "") -> set[str]:
    out: set[str] = set()
    for key, value in data.items():
        out |= _leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"}
    return out


def test_the_readme_documents_exactly_the_fields_a_spec_has(tmp_path: Path) -> None:
    """The README's table rows, read back, against the fields of a resolved spec (another path than the
    generator's): a field missing from the tables, or a row for a field that no longer exists, fails.
    Only the generated block is read: other tables (the metrics fields) have rows of the same form."""
    block = README.read_text().split(BEGIN, 1)[1].split(END, 1)[0]
    rows = set(re.findall(r"^\| `([a-z0-9_.]+)` \|", block, flags=re.MULTILINE))
    # the optional sections set, so that their fields are leaves too
    spec = load_spec("tiny", [f"distill.teacher={tmp_path}", "stability.window=100"])
    assert rows == _leaves(spec_to_dict(spec))

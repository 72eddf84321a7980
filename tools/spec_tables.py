"""Regenerate the run-spec field tables in README.md from the pydantic models.

python tools/spec_tables.py          # rewrite README.md
python tools/spec_tables.py --check  # exit 1 if README.md is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bigtx.config.docs import replace_block, spec_tables_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when out of date")
    args = parser.parse_args()
    current = README.read_text()
    updated = replace_block(current, spec_tables_markdown())
    if args.check:
        if updated != current:
            print("README.md spec tables are out of date: run python tools/spec_tables.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(updated)
    print(f"updated {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

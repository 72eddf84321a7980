"""`bigtx demo` (not implemented yet)."""

from __future__ import annotations

import argparse

from bigtx.cli.common import fail


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="(not implemented yet)")
    p.set_defaults(func=lambda args: fail("bigtx demo is not implemented yet"))

"""`bigtx export` (not implemented yet)."""

from __future__ import annotations

import argparse

from bigtx.cli.common import fail


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="(not implemented yet)")
    p.set_defaults(func=lambda args: fail("bigtx export is not implemented yet"))

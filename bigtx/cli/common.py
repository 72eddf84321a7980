"""Helpers every command uses: the spec from SPEC/--set arguments and turning user errors into exit code 2."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from bigtx.config import RunSpec, SpecError, load_spec

USAGE_ERROR = 2


class UserError(Exception):
    """A mistake in the user's input: printed as one clear message, exit code 2, no traceback."""


def spec_from_args(args: argparse.Namespace) -> RunSpec:
    return load_spec(args.spec, args.overrides)


def fail(message: str, code: int = USAGE_ERROR) -> NoReturn:
    print(f"bigtx: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def report_spec_error(exc: SpecError) -> NoReturn:
    where = f" ({exc.source})" if exc.source else ""
    print(f"bigtx: invalid run spec{where}:", file=sys.stderr)
    for line in exc.errors:
        print(f"  {line}", file=sys.stderr)
    raise SystemExit(USAGE_ERROR)

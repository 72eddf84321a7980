"""Helpers every command uses: the spec from SPEC/--set arguments and turning user errors into exit code 2."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from bigtx.config import ModelSection, RunSpec, SpecError, load_spec

USAGE_ERROR = 2


class UserError(Exception):
    """A mistake in the user's input: printed as one clear message, exit code 2, no traceback."""


def spec_from_args(args: argparse.Namespace) -> RunSpec:
    return load_spec(args.spec, args.overrides)


def teacher_model(spec: RunSpec) -> ModelSection | None:
    """The model section of the spec's ``distill.teacher``, or None without distillation; ``SpecError``
    when the teacher cannot teach this student (``bigtx.distill.open_teacher``)."""
    if spec.distill is None:
        return None
    from bigtx.distill import open_teacher  # reads weights' metadata: only for specs that distill

    return open_teacher(spec.distill.teacher, spec.data, spec.model.vocab_size).spec.model


def fail(message: str, code: int = USAGE_ERROR) -> NoReturn:
    print(f"bigtx: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def report_spec_error(exc: SpecError) -> NoReturn:
    where = f" ({exc.source})" if exc.source else ""
    print(f"bigtx: invalid run spec{where}:", file=sys.stderr)
    for line in exc.errors:
        print(f"  {line}", file=sys.stderr)
    raise SystemExit(USAGE_ERROR)

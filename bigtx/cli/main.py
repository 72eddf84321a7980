"""`bigtx`: parse the command line and dispatch to the command's module."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import bigtx
from bigtx.cli import common
from bigtx.config import SpecError

# Each module registers its sub-commands with `register(subparsers)`.
COMMAND_MODULES = [
    "config_cmd",
    "plan_cmd",
    "tokenizer_cmd",
    "data_cmd",
    "train_cmd",
    "ckpt_cmd",
    "launch_cmd",
    "export_cmd",
    "generate_cmd",
    "distill_cmd",
    "plot_cmd",
    "doctor_cmd",
    "demo_cmd",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bigtx", description="Pretrain decoder-only Transformers with DeepSpeed ZeRO."
    )
    parser.add_argument("--version", action="version", version=f"bigtx {bigtx.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(f"bigtx.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SpecError as exc:
        common.report_spec_error(exc)
    except common.UserError as exc:
        common.fail(str(exc))


if __name__ == "__main__":
    sys.exit(main())

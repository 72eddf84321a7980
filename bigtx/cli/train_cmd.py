"""`bigtx train SPEC [--set ...]`: the main job (see bigtx/train.py)."""

from __future__ import annotations

import argparse
import os
import sys


def _run(args: argparse.Namespace) -> int:
    from bigtx.train import main

    code = main(args.train_args)
    sys.stdout.flush()
    sys.stderr.flush()
    # skip interpreter teardown: a peer that died mid-collective must not make this rank hang at exit
    os._exit(code)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from a run spec (bigtx train SPEC --help)",
        add_help=False,
        description="Train a model from a run spec.",
    )
    p.add_argument("train_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_run)

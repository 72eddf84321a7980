"""`bigtx plot RUN_DIR... [--out FILE.png] [--x step|tokens]`."""

from __future__ import annotations

import argparse
from pathlib import Path

from bigtx.cli.common import UserError


def _plot(args: argparse.Namespace) -> int:
    from bigtx.plot import plot_runs

    runs = [Path(r) for r in args.run_dirs]
    out = Path(args.out) if args.out else runs[0] / "curves.png"
    try:
        plot_runs(runs, out, args.x)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from None
    print(out)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="plot loss, lr, tokens/s and grad norm of one or more runs into a PNG")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (several overlay)")
    p.add_argument("--out", help="PNG file (default RUN_DIR/curves.png of the first run)")
    p.add_argument("--x", choices=["step", "tokens"], default="step", help="x axis")
    p.set_defaults(func=_plot)

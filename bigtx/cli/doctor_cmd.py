"""`bigtx doctor RUN_DIR [--json | --stuck-nodes]`: which rank is stuck or behind, where and since when.

The diagnosis is ``bigtx.doctor``'s; this module prints it.
"""

from __future__ import annotations

import argparse

from bigtx.cli.common import UserError


def _doctor(args: argparse.Namespace) -> int:
    from pathlib import Path

    from bigtx.doctor import DoctorError, diagnose

    try:
        report = diagnose(Path(args.run_dir))
    except DoctorError as exc:
        raise UserError(str(exc)) from None
    if args.json:
        print(report.to_json())
    elif args.stuck_nodes:
        print(",".join(report.stuck_nodes()))
    else:
        print(f"{report.run_dir}: {report.status}")
        for line in report.lines:
            print(f"  {line}")
    return report.exit_code


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "doctor",
        help="say which rank and host is stuck or behind, in which phase, where and since when "
        "(exit 0 nothing wrong, 1 a rank stuck, behind, failed or missing, 2 bad input)",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run's directory (run.dir)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the report as JSON (status, exit_code, blamed, ranks)")
    out.add_argument(
        "--stuck-nodes",
        action="store_true",
        help="print only the nodes of stuck ranks, comma-separated (for sbatch --exclude); nothing if none",
    )
    p.set_defaults(func=_doctor)

"""`bigtx doctor RUN_DIR [--json]`: which rank is stuck or behind, where and since when (``bigtx.doctor``)."""

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
    p.add_argument("--json", action="store_true", help="print the report as JSON (status, exit_code, blamed, ranks)")
    p.set_defaults(func=_doctor)

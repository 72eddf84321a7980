"""`bigtx ckpt list|verify|universal`: look at and convert checkpoints."""

from __future__ import annotations

import argparse
from pathlib import Path

from bigtx.cli.common import UserError


def _list(args: argparse.Namespace) -> int:
    from bigtx import checkpoint

    root = Path(args.run_dir) / "checkpoints"
    found = checkpoint.complete_checkpoints(root)
    if not found:
        raise UserError(f"{root}: no complete checkpoints")
    print(f"{'checkpoint':<16} {'step':>8} {'tokens':>14} {'ranks':>5} {'MB':>9}")
    for path in found:
        meta = checkpoint.read_meta(path)
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6
        print(f"{path.name:<16} {meta['step']:>8} {meta['tokens']:>14,} {meta['world_size']:>5} {size:>9.1f}")
    return 0


def _verified_checkpoint(given: str, tag: str | None) -> Path:
    """The checkpoint meant by ``given`` (and ``tag``), after checking every file against its recorded digest."""
    from bigtx import checkpoint

    try:
        path = checkpoint.resolve(Path(given), tag)
    except checkpoint.CheckpointError as exc:
        raise UserError(str(exc)) from None
    problems = checkpoint.verify(path)
    if problems:
        raise UserError(f"{path} is damaged:\n  " + "\n  ".join(problems))
    return path


def _verify(args: argparse.Namespace) -> int:
    import json

    from bigtx.checkpoint.store import COMPLETE

    path = _verified_checkpoint(args.path, args.tag)
    recorded = len(json.loads((path / COMPLETE).read_text())["files"])
    if recorded:
        print(f"{path}: ok (size and digest checked for {recorded} file(s))")
    else:
        print(f"{path}: complete, but no file digests were recorded (a universal copy made from a verified checkpoint)")
    return 0


def _universal(args: argparse.Namespace) -> int:
    from bigtx import checkpoint

    path = _verified_checkpoint(args.path, args.tag)
    if path.parent.name == "universal":
        raise UserError(f"{path} is already a universal checkpoint")
    out = checkpoint.to_universal(path, Path(args.out) if args.out else None)
    print(f"universal checkpoint: {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ckpt", help="list, verify and convert checkpoints")
    csub = p.add_subparsers(dest="ckpt_command", metavar="SUBCOMMAND")
    csub.required = True
    q = csub.add_parser("list", help="complete checkpoints of a run, newest first")
    q.add_argument("run_dir", metavar="RUN_DIR")
    q.set_defaults(func=_list)
    q = csub.add_parser("verify", help="check every file of a checkpoint against its recorded size and digest")
    q.add_argument("path", metavar="CHECKPOINT_OR_RUN_DIR")
    q.add_argument("--tag", help="checkpoint of the run: step_00000020, 20 or universal/step_... (default: newest)")
    q.set_defaults(func=_verify)
    q = csub.add_parser(
        "universal",
        help="convert to DeepSpeed's universal format (resuming at another world size does this by itself)",
    )
    q.add_argument("path", metavar="CHECKPOINT_OR_RUN_DIR")
    q.add_argument("--tag", help="checkpoint of the run: step_00000020 or 20 (default: newest)")
    q.add_argument("--out", help="output directory (default: RUN_DIR/checkpoints/universal/step_N)")
    q.set_defaults(func=_universal)

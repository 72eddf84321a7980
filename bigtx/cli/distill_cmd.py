"""`bigtx distill cache SPEC --out DIR`: a teacher's top-k per position for every row a run trains on
(``bigtx.teacher_cache``), so that the run reads them (``distill.source: DIR``) instead of running the
teacher."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bigtx.cli.common import UserError
from bigtx.config import SpecError, add_spec_args, load_spec


def _cache(args: argparse.Namespace) -> int:
    from bigtx.config.sizes import parse_size
    from bigtx.data import DataError
    from bigtx.teacher_cache import build_cache

    out = Path(args.out)
    if out.exists():
        raise UserError(f"--out {out} already exists; remove it or choose another directory (a cache is never merged)")
    if args.world_size < 1 or args.batch_rows < 1:
        raise UserError(f"--world-size ({args.world_size}) and --batch-rows ({args.batch_rows}) must be at least 1")
    try:
        shard_bytes = parse_size(args.shard_size)
    except ValueError as exc:
        raise UserError(f"--shard-size: {exc}") from None
    # the spec's own distill.source may name the cache this command is about to write
    overrides = [*args.overrides, "distill.source=online"]
    overrides += [f"distill.teacher={args.teacher}"] if args.teacher is not None else []
    overrides += [f"distill.top_k={args.top_k}"] if args.top_k is not None else []
    overrides += [f"data.train={args.data}"] if args.data is not None else []
    try:
        spec = load_spec(args.spec, overrides)
    except SpecError as exc:
        missing = "distill.teacher: required field is missing"
        exc.errors = [e if e != missing else f"{e}: give --teacher DIR" for e in exc.errors]
        raise
    assert spec.distill is not None
    try:
        manifest = build_cache(spec, out, args.world_size, batch_rows=args.batch_rows, shard_bytes=shard_bytes)
    except DataError as exc:
        raise UserError(str(exc)) from None
    tokens, seconds = manifest["tokens"], manifest["seconds"]
    summary = {
        "out": str(out),
        "slots": manifest["stream"]["slots"],
        "rows_per_slot": manifest["rows_per_slot"],
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "bytes": manifest["bytes"],
        "bytes_per_token": round(manifest["bytes"] / tokens, 3),
    }
    print(
        f"teacher cache {out}: {tokens:,} tokens in {seconds:.1f}s ({tokens / seconds:,.0f} tokens/s), "
        f"{manifest['bytes'] / 1e6:.1f} MB ({manifest['bytes'] / tokens:.1f} bytes/token); "
        f"train with --set distill.source={out}"
    )
    print(json.dumps(summary))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="knowledge distillation: precompute a teacher's outputs (bigtx distill cache)")
    commands = p.add_subparsers(dest="distill_command", metavar="COMMAND")
    commands.required = True
    c = commands.add_parser(
        "cache",
        help="write the teacher's top-k log-probabilities for every row a run trains on",
        description="Run the teacher over the run's training stream (the same documents, order and packing, "
        "per data slot) and write its top-k log-probabilities and token ids per position as WebDataset shards "
        "with a manifest; train with distill.source=DIR.",
    )
    add_spec_args(c)
    c.add_argument("--out", required=True, metavar="DIR", help="the cache directory to create (must not exist)")
    c.add_argument("--teacher", metavar="DIR", help="the teacher (default: the spec's distill.teacher)")
    c.add_argument("--data", metavar="SHARDS", help="training data (default: the spec's data.train)")
    c.add_argument("--top-k", type=int, metavar="K", help="tokens kept per position (default: distill.top_k)")
    c.add_argument(
        "--world-size",
        type=int,
        default=1,
        help="the training run's world size: the cache serves every layout with as many data slots "
        "(world size x readers per rank) (default 1)",
    )
    c.add_argument("--batch-rows", type=int, default=8, help="rows per teacher forward pass (default 8)")
    c.add_argument("--shard-size", default="64MB", help="cut shards after this size (default 64MB)")
    c.set_defaults(func=_cache)

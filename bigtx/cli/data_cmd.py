"""`bigtx data build|inspect`: tokenized WebDataset shards."""

from __future__ import annotations

import argparse
import os

from bigtx.cli.common import UserError


def _build_options(args: argparse.Namespace) -> dict:
    """The options ``data build`` passes alike to a whole build and to one part (a part records them,
    and merge checks that every part had the same). Raises ``DataError`` for a bad ``--shard-size``."""
    from bigtx.data.build import parse_size

    return {
        "shard_size": None if args.shard_size is None else parse_size(args.shard_size),
        "val_fraction": args.val_fraction,
        "workers": args.workers,
        "text_field": args.text_field,
        "overwrite": args.overwrite,
        "progress": False if args.no_progress else None,
    }


def _build(args: argparse.Namespace) -> int:
    from bigtx.data.build import build_shards, summary
    from bigtx.data.errors import DataError

    if args.part is not None:
        return _build_part(args)
    try:
        index = build_shards(
            args.input,
            args.tokenizer,
            args.out,
            **_build_options(args),
        )
    except DataError as exc:
        raise UserError(str(exc)) from None
    print(summary(index))
    print(f"wrote {os.path.join(args.out, 'index.json')}")
    return 0


def _build_part(args: argparse.Namespace) -> int:
    from bigtx.data.errors import DataError
    from bigtx.data.parts import build_part, parse_part

    try:
        part, parts = parse_part(args.part)
        record = build_part(
            args.input,
            args.tokenizer,
            args.out,
            part,
            parts,
            **_build_options(args),
        )
    except DataError as exc:
        raise UserError(str(exc)) from None
    mb = record["stats"]["text_bytes"] / 1e6
    print(
        f"part {part}/{parts}: {record['documents']:,} documents, {record['tokens']:,} tokens, {mb:,.2f} MB of text "
        f"from {len(record['units'])} input unit(s) in {record['seconds']:.1f}s"
    )
    print(f"wrote {args.out}; when every part is built: bigtx data merge PART_DIRS... --out DIR")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from bigtx.data.build import summary
    from bigtx.data.errors import DataError
    from bigtx.data.parts import merge_parts

    try:
        index = merge_parts(args.parts, args.out, overwrite=args.overwrite)
    except DataError as exc:
        raise UserError(str(exc)) from None
    print(summary({**index, "seconds": None}))
    print(f"merged {len(args.parts)} part(s) in {index['seconds']:.1f}s; wrote {os.path.join(args.out, 'index.json')}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from bigtx.data.errors import DataError
    from bigtx.data.inspection import inspect_dir

    try:
        ok = inspect_dir(
            args.dir,
            samples=args.samples,
            tokenizer=args.tokenizer,
            verify=args.verify,
            split=args.split,
            max_shards=args.max_shards,
        )
    except DataError as exc:
        raise UserError(str(exc)) from None
    return 0 if ok else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="build and inspect tokenized shards")
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    dsub.required = True

    desc = (
        "Tokenize text files (one document per file), .jsonl files (one per line), optionally .gz or .zst, "
        ".parquet files and Hugging Face datasets save_to_disk directories (one per row) into "
        "WebDataset shards train-000000.tar, val-000000.tar, ... and DIR/index.json. Same input, "
        "byte-identical output."
    )
    b = dsub.add_parser("build", help="tokenize text into shards", description=desc)
    b.add_argument("--input", nargs="+", required=True, metavar="PATH_OR_GLOB", help="files, globs or directories")
    b.add_argument("--tokenizer", required=True, metavar="T", help="`byte` or a tokenizer.json")
    b.add_argument("--out", required=True, metavar="DIR", help="output directory")
    b.add_argument(
        "--shard-size",
        default=None,
        metavar="SIZE",
        help="largest shard, e.g. 64MB, 256MiB (default: about 32 train shards, at most 64MB each)",
    )
    b.add_argument(
        "--val-fraction",
        type=float,
        default=0.01,
        metavar="F",
        help="share of documents for the val split, chosen by a hash of the text (default 0.01)",
    )
    b.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        metavar="N",
        help="tokenizer processes (default: CPU cores, at most 8)",
    )
    b.add_argument(
        "--text-field",
        default="text",
        help="field (column) holding the text in .jsonl, .parquet and .arrow inputs (default: text)",
    )
    b.add_argument(
        "--part",
        default=None,
        metavar="I/N",
        help="tokenize only part I of N of the inputs into DIR (files split by byte or row-group range); "
        "`bigtx data merge` then writes the shards, identical to a build without --part",
    )
    b.add_argument("--overwrite", action="store_true", help="replace shards and index (or the part) already in DIR")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=_build)

    m = dsub.add_parser(
        "merge",
        help="write the shards of a build made in parts (--part I/N)",
        description="Combine the N part directories of `bigtx data build --part I/N` into shards and DIR/index.json, "
        "byte-identical to one `bigtx data build` of the same inputs and options. Parts may be given in any order.",
    )
    m.add_argument("parts", nargs="+", metavar="PART_DIR", help="the --out directories of every part")
    m.add_argument("--out", required=True, metavar="DIR", help="output directory")
    m.add_argument("--overwrite", action="store_true", help="replace shards and index already in DIR")
    m.set_defaults(func=_merge)

    i = dsub.add_parser(
        "inspect",
        help="totals, shard table and a few decoded samples of a build",
        description="Print what `bigtx data build` wrote to DIR.",
    )
    i.add_argument("dir", metavar="DIR", help="a `bigtx data build` output directory")
    i.add_argument("--samples", type=int, default=3, metavar="N", help="decoded samples to show (default 3)")
    i.add_argument("--split", choices=["train", "val"], default="train", help="split to show samples of")
    i.add_argument(
        "--tokenizer",
        default=None,
        metavar="T",
        help="tokenizer to decode with (default: the one recorded in index.json, if found)",
    )
    i.add_argument("--max-shards", type=int, default=20, metavar="N", help="shard table rows per split (default 20)")
    i.add_argument("--verify", action="store_true", help="read every shard and check its sha256 and samples")
    i.set_defaults(func=_inspect)

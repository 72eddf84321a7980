"""`bigtx tokenizer train`: a byte-level BPE tokenizer.json from text files."""

from __future__ import annotations

import argparse

from bigtx.cli.common import UserError


def _train(args: argparse.Namespace) -> int:
    from bigtx.data.errors import DataError
    from bigtx.data.inputs import ReadStats, expand_inputs, iter_documents
    from bigtx.data.tokenizer import EOS_TOKEN, PAD_TOKEN, train_tokenizer

    try:
        files = expand_inputs(args.input)
        stats = ReadStats()
        texts = (text for _, text in iter_documents(files, stats, args.text_field))
        tok = train_tokenizer(texts, args.vocab_size, args.out, min_frequency=args.min_frequency)
    except DataError as exc:
        raise UserError(str(exc)) from None
    if stats.documents == 0:
        raise UserError(f"--input: no documents in {len(files)} file(s)")
    print(
        f"{args.out}: byte-level BPE, {tok.vocab_size} tokens ({EOS_TOKEN} = {tok.eos_id}, {PAD_TOKEN} = {tok.pad_id}) "
        f"from {stats.documents:,} documents in {stats.files} file(s); sha256 {tok.sha256}"
    )
    if tok.vocab_size < args.vocab_size:
        print(f"note: the text only supports {tok.vocab_size} of the {args.vocab_size} tokens asked for")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND")
    tsub.required = True
    desc = (
        "Train a byte-level BPE with Hugging Face tokenizers and write tokenizer.json (EOS <|endoftext|>, "
        "PAD <|pad|>). Same input, same file. Inputs: text files (one document each) and .jsonl, optionally .gz or "
        ".zst, .parquet, Hugging Face datasets directories. "
        "The built-in `byte` tokenizer needs no training."
    )
    t = tsub.add_parser("train", help="train a tokenizer.json from text", description=desc)
    t.add_argument("--input", nargs="+", required=True, metavar="PATH_OR_GLOB", help="files, globs or directories")
    t.add_argument("--vocab-size", type=int, required=True, metavar="N", help="vocabulary size incl. the 2 specials")
    t.add_argument("--out", required=True, metavar="FILE", help="where to write tokenizer.json")
    t.add_argument(
        "--text-field",
        default="text",
        help="field (column) holding the text in .jsonl, .parquet and .arrow inputs (default: text)",
    )
    t.add_argument("--min-frequency", type=int, default=2, help="merge only pairs seen this often (default: 2)")
    t.set_defaults(func=_train)

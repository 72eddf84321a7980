"""`bigtx data inspect`: what a build directory holds."""

from __future__ import annotations

import os

from bigtx.data.errors import DataError
from bigtx.data.shards import CorruptShard, read_shard
from bigtx.data.sources import INDEX_NAME, read_index, resolve_source
from bigtx.data.tokenizer import Tokenizer, load_tokenizer


def _decoder(index: dict, override: str | None, out) -> Tokenizer | None:
    rec = index.get("tokenizer") or {}
    spec = override or rec.get("source")
    if not spec:
        return None
    try:
        tok = load_tokenizer(spec)
    except DataError as exc:
        print(f"(cannot decode: {exc}; showing token ids)", file=out)
        return None
    if tok.sha256 != rec.get("sha256"):
        print(f"(cannot decode: tokenizer {spec!r} is not the one the shards were built with; showing ids)", file=out)
        return None
    return tok


def _header(directory: str, index: dict, out) -> None:
    """What built the shards and with which tokenizer; fields a hand-made index lacks print as '?'."""
    rec = index.get("tokenizer") or {}
    print(f"{directory}: {index.get('created_by', '?')}, ids {index.get('dtype', '?')}", file=out)
    sha = rec.get("sha256")
    print(
        f"tokenizer {rec.get('source', '?')!r}: vocab {rec.get('vocab_size', '?')}, eos {rec.get('eos_id', '?')}, "
        f"pad {rec.get('pad_id', '?')}, sha256 {sha[:16] + '...' if isinstance(sha, str) else '?'}",
        file=out,
    )
    stats = index.get("stats")
    keys = ("files", "documents", "text_bytes", "empty_docs_skipped", "bad_lines_skipped", "non_utf8_docs")
    if isinstance(stats, dict) and all(isinstance(stats.get(k), int) for k in keys):
        print(
            f"input: {stats['files']} file(s), {stats['documents']:,} documents, {stats['text_bytes'] / 1e6:,.2f} MB; "
            f"skipped {stats['empty_docs_skipped']} empty, {stats['bad_lines_skipped']} bad lines; "
            f"{stats['non_utf8_docs']} with non-UTF-8 bytes replaced",
            file=out,
        )


def _total(shards: list, attr: str) -> int | None:
    values = [getattr(sh, attr) for sh in shards]
    return None if None in values else sum(values)


def _figure(value: int | None, scale: float = 1.0, fmt: str = ",") -> str:
    return "?" if value is None else format(value / scale if scale != 1.0 else value, fmt)


def inspect_dir(
    directory: str,
    *,
    samples: int = 3,
    tokenizer: str | None = None,
    verify: bool = False,
    split: str = "train",
    max_shards: int = 20,
    out=None,
) -> bool:
    """Print totals, a shard table and ``samples`` decoded documents; False if ``verify`` found bad shards.

    The index is read with the loader's own checks (``sources.resolve_source``): a hostile or damaged
    index is a ``DataError``, and only files inside ``directory`` are ever read.
    """
    path = os.path.join(directory, INDEX_NAME)
    if not os.path.isfile(path):
        raise DataError(f"DIR: {directory} has no {INDEX_NAME}; is it a `bigtx data build` output?")
    index = read_index(path, "DIR")
    _header(directory, index, out)
    splits = {name: resolve_source(directory, name, "DIR").shards for name in index["splits"]}
    ok = True
    for name, shards in splits.items():
        print(
            f"\n{name}: {_figure(_total(shards, 'samples'))} documents, {_figure(_total(shards, 'tokens'))} tokens, "
            f"{len(shards)} shard(s), {_figure(_total(shards, 'size'), 1e6, ',.2f')} MB",
            file=out,
        )
        if shards:
            print(f"  {'shard':<18} {'docs':>9} {'tokens':>13} {'MB':>9}  sha256", file=out)
        for i, sh in enumerate(shards):
            status = ""
            if verify:
                try:
                    read_shard(sh.url, sh.sha256, sh.samples, sh.size)
                    status = "  ok"
                except CorruptShard as exc:
                    status, ok = f"  BAD: {exc}", False
            if i < max_shards or status.startswith("  BAD"):
                print(
                    f"  {sh.name:<18} {_figure(sh.samples):>9} {_figure(sh.tokens):>13} "
                    f"{_figure(sh.size, 1e6, '.2f'):>9}  {(sh.sha256 or '?')[:16]}{status}",
                    file=out,
                )
            elif i == max_shards:
                print(f"  ... {len(shards) - max_shards} more (--max-shards)", file=out)
    shards = splits.get(split, [])
    if samples > 0 and shards:
        tok = _decoder(index, tokenizer, out)
        print(f"\nfirst {samples} document(s) of {shards[0].name}:", file=out)
        try:
            data = read_shard(shards[0].url, with_sources=True)
        except CorruptShard as exc:
            print(f"  cannot read it: {exc}", file=out)
            return False
        for key, source, ids in list(zip(data.keys, data.sources or [], data.docs))[:samples]:
            text = tok.decode(ids.tolist()) if tok is not None else " ".join(map(str, ids[:64].tolist()))
            if len(text) > 300:
                text = text[:300] + " [...]"
            print(f"- {key} ({source}, {ids.shape[0]} tokens): {text!r}", file=out)
    if verify:
        print("\nverify: " + ("all shards ok" if ok else "BAD shards found (see above)"), file=out)
    return ok

"""`bigtx data inspect`: what a build directory holds."""

from __future__ import annotations

import os

from bigtx.data.errors import DataError
from bigtx.data.shards import CorruptShard, read_shard
from bigtx.data.sources import INDEX_NAME, read_index
from bigtx.data.tokenizer import Tokenizer, load_tokenizer


def _decoder(index: dict, override: str | None, out) -> Tokenizer | None:
    rec = index.get("tokenizer", {})
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
    """Print totals, a shard table and ``samples`` decoded documents; False if ``verify`` found bad shards."""
    path = os.path.join(directory, INDEX_NAME)
    if not os.path.isfile(path):
        raise DataError(f"DIR: {directory} has no {INDEX_NAME}; is it a `bigtx data build` output?")
    index = read_index(path, "DIR")
    rec = index["tokenizer"]
    print(f"{directory}: {index['created_by']}, ids {index['dtype']}", file=out)
    print(
        f"tokenizer {rec['source']!r}: vocab {rec['vocab_size']}, eos {rec['eos_id']}, pad {rec['pad_id']}, "
        f"sha256 {rec['sha256'][:16]}...",
        file=out,
    )
    stats = index.get("stats", {})
    if stats:
        print(
            f"input: {stats['files']} file(s), {stats['documents']:,} documents, {stats['text_bytes'] / 1e6:,.2f} MB; "
            f"skipped {stats['empty_docs_skipped']} empty, {stats['bad_lines_skipped']} bad lines; "
            f"{stats['non_utf8_docs']} with non-UTF-8 bytes replaced",
            file=out,
        )
    ok = True
    for name, sp in index["splits"].items():
        print(
            f"\n{name}: {sp['samples']:,} documents, {sp['tokens']:,} tokens, {len(sp['shards'])} shard(s), "
            f"{sp['bytes'] / 1e6:,.2f} MB",
            file=out,
        )
        if sp["shards"]:
            print(f"  {'shard':<18} {'docs':>9} {'tokens':>13} {'MB':>9}  sha256", file=out)
        for i, sh in enumerate(sp["shards"]):
            status = ""
            if verify:
                try:
                    read_shard(os.path.join(directory, sh["name"]), sh["sha256"], sh["samples"], sh["bytes"])
                    status = "  ok"
                except CorruptShard as exc:
                    status, ok = f"  BAD: {exc}", False
            if i < max_shards or status.startswith("  BAD"):
                print(
                    f"  {sh['name']:<18} {sh['samples']:>9,} {sh['tokens']:>13,} {sh['bytes'] / 1e6:>9.2f}  "
                    f"{sh['sha256'][:16]}{status}",
                    file=out,
                )
            elif i == max_shards:
                print(f"  ... {len(sp['shards']) - max_shards} more (--max-shards)", file=out)
    shards = index["splits"].get(split, {}).get("shards", [])
    if samples > 0 and shards:
        tok = _decoder(index, tokenizer, out)
        print(f"\nfirst {samples} document(s) of {shards[0]['name']}:", file=out)
        try:
            data = read_shard(os.path.join(directory, shards[0]["name"]), with_sources=True)
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

"""Turning ``data.train`` / ``data.val`` into lists of shards, and the checks that run before any loading.

A source string may be

* a ``bigtx data build`` directory (or its ``index.json``): the split's shards, with sha256 and sample
  counts to verify against, and the tokenizer hash to compare with ``data.tokenizer``;
* a URL of such an index (``https://host/ds/index.json``; shard URLs are taken relative to it);
* a shard pattern: a path or URL with brace ranges (``train-{000000..000099}.tar``), a local glob
  (``shards/*.tar``), a single ``.tar``, any URL ``webdataset.gopen`` opens (``http(s)://``, ``pipe:``,
  ``file:``, ...); several patterns may be joined with ``::``.

Shards from a pattern carry no index: no hash check and no tokenizer check is possible for them.
"""

from __future__ import annotations

import glob
import json
import os
import posixpath
from dataclasses import dataclass, field
from urllib.parse import urlparse
from urllib.request import url2pathname

from bigtx.data.errors import DataError
from bigtx.data.tokenizer import Tokenizer, load_tokenizer

INDEX_NAME = "index.json"


@dataclass(frozen=True)
class Shard:
    url: str
    name: str
    sha256: str | None = None
    samples: int | None = None
    tokens: int | None = None
    size: int | None = None


@dataclass
class Source:
    """One weighted source: its shards for one split, and the index they came from (if any)."""

    label: str  # the spec field, for messages: "data.train" or "data.train[1]"
    spec: str
    weight: float
    shards: list[Shard]
    index: dict | None = field(default=None, repr=False)
    index_path: str | None = None

    @property
    def tokens(self) -> int | None:
        counts = [s.tokens for s in self.shards]
        return None if any(c is None for c in counts) else sum(counts)  # type: ignore[misc]


def _scheme(s: str) -> str:
    if s.startswith("pipe:"):
        return "pipe"
    scheme = urlparse(s).scheme
    return scheme if len(scheme) > 1 else ""  # a Windows drive letter is no scheme


def _local(s: str) -> str | None:
    """The local path of ``s``, or None if it is a remote URL or a pipe."""
    scheme = _scheme(s)
    if scheme == "":
        return s
    if scheme == "file":
        return url2pathname(urlparse(s).path)
    return None


def read_index(location: str, label: str) -> dict:
    local = _local(location)
    try:
        if local is not None:
            with open(local, "rb") as f:
                raw = f.read()
        else:
            from webdataset.gopen import gopen

            with gopen(location, "rb") as f:
                raw = f.read()
        index = json.loads(raw)
    except (OSError, ValueError) as exc:
        raise DataError(f"{label}: cannot read {location}: {exc}") from None
    if not isinstance(index, dict) or index.get("format") != "bigtx-shards":
        raise DataError(f"{label}: {location} is not an index.json written by `bigtx data build`")
    if index.get("version") != 1:
        raise DataError(f"{label}: {location} has index version {index.get('version')}; this bigtx reads version 1")
    return index


def _index_source(location: str, split: str, label: str, spec: str, weight: float) -> Source:
    index = read_index(location, label)
    base = location[: -len(INDEX_NAME)]
    entries = index["splits"].get(split, {}).get("shards", [])
    shards = [
        Shard(
            url=os.path.join(base, e["name"]) if _local(location) is not None else posixpath.join(base, e["name"]),
            name=e["name"],
            sha256=e.get("sha256"),
            samples=e.get("samples"),
            tokens=e.get("tokens"),
            size=e.get("bytes"),
        )
        for e in entries
    ]
    missing = [s.url for s in shards if _local(s.url) is not None and not os.path.isfile(_local(s.url))]  # type: ignore[arg-type]
    if missing:
        raise DataError(
            f"{label}: {len(missing)} of the {len(shards)} {split} shards listed in {location} are missing, "
            f"e.g. {missing[0]}"
        )
    return Source(label, spec, weight, shards, index, location)


def _pattern_shards(pattern: str, label: str) -> list[Shard]:
    from webdataset.shardlists import expand_urls  # webdataset's own rules: "::" lists, braces, WDS_ variables

    urls: list[str] = []
    for url in expand_urls(pattern):
        url = url.strip()
        if not url:
            continue
        if _scheme(url) == "" and set("*?[") & set(url):
            found = sorted(glob.glob(url))
            if not found:
                raise DataError(f"{label}: {url!r} matches no files")
            urls.extend(found)
        else:
            urls.append(url)
    if not urls:
        raise DataError(f"{label}: {pattern!r} names no shards")
    missing = [u for u in urls if _local(u) is not None and not os.path.isfile(_local(u))]  # type: ignore[arg-type]
    if missing:
        raise DataError(f"{label}: {len(missing)} of {len(urls)} shards do not exist, e.g. {missing[0]}")
    return [Shard(url=u, name=posixpath.basename(u.rstrip("/")) or u) for u in urls]


def resolve_source(spec: str, split: str, label: str, weight: float = 1.0) -> Source:
    """One source string -> its shards for ``split`` (``train`` or ``val``)."""
    spec = spec.strip()
    if not spec:
        raise DataError(f"{label}: empty path")
    local = _local(spec)
    if local is not None and os.path.isdir(local):
        index_path = os.path.join(local, INDEX_NAME)
        if not os.path.isfile(index_path):
            raise DataError(
                f"{label}: {spec} has no {INDEX_NAME}, so it is not a `bigtx data build` directory; "
                f"build it, or give a shard pattern such as {os.path.join(spec, 'train-{000000..000009}.tar')}"
            )
        return _index_source(index_path, split, label, spec, weight)
    if spec.endswith(INDEX_NAME) and "{" not in spec:
        if local is not None and not os.path.isfile(local):
            raise DataError(f"{label}: no such file {spec}")
        return _index_source(spec if local is None else local, split, label, spec, weight)
    if local is not None and "{" not in spec and "::" not in spec and not set("*?[") & set(local):
        if not os.path.exists(local):
            raise DataError(f"{label}: no such file or directory: {spec}")
    return Source(label, spec, weight, _pattern_shards(spec, label))


def resolve(value, split: str, label: str) -> list[Source]:
    """``data.train``/``data.val`` (a string or a list of ``DataSource``) -> sources."""
    if isinstance(value, str):
        return [resolve_source(value, split, label)]
    if not value:
        raise DataError(f"{label}: empty list of sources")
    return [resolve_source(s.path, split, f"{label}[{i}].path", s.weight) for i, s in enumerate(value)]


def split_sources(spec_data, split: str) -> list[Source]:
    """The sources of ``split`` for a ``DataSection``, with empty ones removed; raises ``DataError`` if none."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    if split == "train":
        if spec_data.train is None:
            raise DataError("data.train: no training data; set it to a `bigtx data build` directory or a shard pattern")
        sources = resolve(spec_data.train, "train", "data.train")
        empty = [s for s in sources if not s.shards]
        if empty:
            raise DataError(f"{empty[0].label}: {empty[0].spec} has no train shards")
        return sources
    if spec_data.val is not None:
        sources = [s for s in resolve(spec_data.val, "val", "data.val") if s.shards]
        if not sources:
            raise DataError("data.val: the given directories have no val shards (build with --val-fraction > 0)")
        return sources
    if spec_data.train is None:
        raise DataError("data.val: no validation data: data.val and data.train are both unset")
    train = resolve(spec_data.train, "val", "data.train")
    sources = [s for s in train if s.index is not None and s.shards]
    if not sources:
        raise DataError(
            "data.val: no validation data: data.val is unset and data.train has no `bigtx data build` "
            "directory with a val split (build with --val-fraction > 0, or set data.val)"
        )
    return sources


def check_sources(sources: list[Source], tok: Tokenizer, tokenizer_spec: str, vocab_size: int) -> None:
    """Tokenizer hash and vocabulary checks against each source's index."""
    for src in sources:
        if src.index is None:
            continue
        rec = src.index.get("tokenizer", {})
        if rec.get("sha256") != tok.sha256:
            raise DataError(
                f"{src.label}: {src.index_path} was built with tokenizer {rec.get('source')!r} "
                f"(sha256 {rec.get('sha256')}), but data.tokenizer {tokenizer_spec!r} has sha256 {tok.sha256}; "
                "rebuild the shards or point data.tokenizer at the tokenizer they were built with"
            )
        if src.index.get("dtype") not in ("uint16", "uint32"):
            raise DataError(f"{src.label}: {src.index_path} has unknown dtype {src.index.get('dtype')!r}")
        if int(src.index.get("vocab_size", 0)) > vocab_size:
            raise DataError(
                f"{src.label}: {src.index_path} has vocab_size {src.index['vocab_size']}, above "
                f"model.vocab_size={vocab_size}"
            )


def check_tokenizer(tokenizer_spec: str, vocab_size: int) -> Tokenizer:
    tok = load_tokenizer(tokenizer_spec)
    if tok.vocab_size > vocab_size:
        raise DataError(
            f"data.tokenizer: its vocabulary has {tok.vocab_size} tokens, more than model.vocab_size={vocab_size}; "
            f"raise model.vocab_size to at least {tok.vocab_size} (a multiple of 64: {-(-tok.vocab_size // 64) * 64})"
        )
    return tok


def check_data(spec_data, vocab_size: int) -> None:
    """Every check ``build_loader`` does eagerly, without building loaders: tokenizer, paths, index, hashes.

    The val split is only checked when ``data.val`` is set explicitly (otherwise it is optional).
    Raises ``DataError`` whose message starts with the field at fault.
    """
    tok = check_tokenizer(spec_data.tokenizer, vocab_size)
    check_sources(split_sources(spec_data, "train"), tok, spec_data.tokenizer, vocab_size)
    if spec_data.val is not None:
        check_sources(split_sources(spec_data, "val"), tok, spec_data.tokenizer, vocab_size)

"""Turning ``data.train`` / ``data.val`` into lists of shards, and the checks that run before any loading.

A source string may be

* a ``bigtx data build`` directory (or its ``index.json``): the split's shards, with sha256 and sample
  counts to verify against, and the tokenizer hash to compare with ``data.tokenizer``;
* a URL of such an index (``https://host/ds/index.json``; shard URLs are taken relative to it);
* a shard pattern: a path or URL with brace ranges (``train-{000000..000099}.tar``), a local glob
  (``shards/*.tar``), a single ``.tar``, an ``http(s)://`` URL or any URL ``webdataset.gopen`` opens
  (``pipe:``, ``file:``, ...); several patterns may be joined with ``::``.

Shards from a pattern carry no index: no hash check and no tokenizer check is possible for them.

An index is checked before use: shard names must be relative paths inside its directory (no absolute
path, ``..``, backslash, ``:`` or control character; a remote or ``pipe:`` index's names, which become
part of URLs or shell commands, only letters, digits and ``._-+=,@~/``), sha256 a
64-digit hex string, sample/token/byte counts non-negative integers. A hostile or damaged index gives a
``DataError`` naming the field, the index and the bad value. A remote index is fetched like a shard
(``shards.fetch``: timeouts and server errors are retried).
"""

from __future__ import annotations

import glob
import json
import os
import posixpath
import re
from dataclasses import dataclass, field
from urllib.parse import urlparse
from urllib.request import url2pathname

from bigtx.data.errors import DataError
from bigtx.data.shards import CorruptShard, fetch
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
    """The index at a local path or URL (fetched with ``shards.fetch``: HTTP errors are retried), with its
    top-level fields checked. Raises ``DataError``."""
    local = _local(location)
    try:
        if local is None:
            raw = fetch(location)
        else:
            with open(local, "rb") as f:
                raw = f.read()
    except (CorruptShard, OSError) as exc:
        raise DataError(f"{label}: cannot read {location}: {str(exc).removeprefix('cannot read: ')}") from None
    try:
        index = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise DataError(f"{label}: {location} is not valid JSON: {exc}") from None
    if not isinstance(index, dict) or index.get("format") != "bigtx-shards":
        raise DataError(f"{label}: {location} is not an index.json written by `bigtx data build`")
    if index.get("version") != 1:
        raise DataError(f"{label}: {location} has index version {index.get('version')}; this bigtx reads version 1")
    problem = None
    if not isinstance(index.get("splits"), dict):
        problem = "'splits' is not a mapping of split names to shard lists"
    elif not isinstance(index.get("tokenizer", {}), dict):
        problem = "'tokenizer' is not a mapping"
    elif "vocab_size" in index and not _count(index["vocab_size"]):
        problem = f"'vocab_size' is {index['vocab_size']!r}, not a non-negative integer"
    if problem:
        raise DataError(f"{label}: {location}: {problem}; rebuild it with `bigtx data build`")
    return index


_HEX64 = re.compile(r"[0-9a-f]{64}")
_REMOTE_NAME = re.compile(r"[A-Za-z0-9._~/+=,@-]+")


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _name_problem(name, remote: bool) -> str | None:
    """Why ``name`` is no relative path inside the dataset directory (None if it is one)."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a string"
    if not name:
        return "is empty"
    if "\\" in name:
        return "contains a backslash"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "contains a control character"
    if name.startswith("/") or os.path.isabs(name):
        return "is an absolute path"
    if ":" in name:
        return "contains ':' (a URL scheme or drive letter)"
    if ".." in name.split("/"):
        return "has a '..' component"
    if remote and not _REMOTE_NAME.fullmatch(name):  # the name becomes part of a URL, or of a pipe: command
        return "has characters other than A-Z a-z 0-9 . _ - + = , @ ~ / (not allowed in a remote index)"
    return None


def _shard_entries(index: dict, split: str, location: str, label: str) -> list[dict]:
    """The checked shard entries of ``split``: a hostile or damaged index gives a ``DataError`` naming the entry."""
    where = f"splits.{split}"
    sp = index["splits"].get(split, {})
    entries = sp.get("shards", []) if isinstance(sp, dict) else None
    if not isinstance(entries, list):
        what = "a mapping" if not isinstance(sp, dict) else "a mapping whose 'shards' is a list"
        raise DataError(f"{label}: {location}: {where} is not {what}; rebuild it with `bigtx data build`")
    remote = _local(location) is None
    for i, e in enumerate(entries):
        field = f"{where}.shards[{i}]"
        problem = None
        if not isinstance(e, dict):
            problem = f"{field} is not a mapping"
        elif (why := _name_problem(e.get("name"), remote)) is not None:
            problem = (
                f"{field}.name {e.get('name')!r} {why}; shard names must be relative paths inside the dataset directory"
            )
        elif "sha256" in e and not (isinstance(e["sha256"], str) and _HEX64.fullmatch(e["sha256"])):
            problem = f"{field}.sha256 {e['sha256']!r} is not 64 lower-case hex digits"
        else:
            bad = next((k for k in ("samples", "tokens", "bytes") if k in e and not _count(e[k])), None)
            if bad is not None:
                problem = f"{field}.{bad} is {e[bad]!r}, not a non-negative integer"
        if problem:
            raise DataError(f"{label}: {location}: {problem}")
    return entries


def _index_source(location: str, split: str, label: str, spec: str, weight: float) -> Source:
    index = read_index(location, label)
    base = location[: -len(INDEX_NAME)]
    join = os.path.join if _local(location) is not None else posixpath.join
    shards = [
        Shard(
            url=join(base, e["name"]),
            name=e["name"],
            sha256=e.get("sha256"),
            samples=e.get("samples"),
            tokens=e.get("tokens"),
            size=e.get("bytes"),
        )
        for e in _shard_entries(index, split, location, label)
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
            raise DataError(
                f"{empty[0].label}: {empty[0].spec} has no train shards; rebuild it with more input or a lower "
                "--val-fraction"
            )
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


def val_sets(spec_data) -> dict[str | None, list[Source]]:
    """The validation sets of a ``DataSection``: one per named source of ``data.val`` (key: its name),
    otherwise one (key None) holding ``split_sources(spec_data, "val")``. Raises ``DataError``; a named
    source without val shards is an error, since its metric would silently be missing."""
    if not spec_data.val_names:
        return {None: split_sources(spec_data, "val")}
    sets: dict[str | None, list[Source]] = {}
    for i, entry in enumerate(spec_data.val):
        label = f"data.val[{i}].path"
        source = resolve_source(entry.path, "val", label)
        if not source.shards:
            raise DataError(f"{label}: {entry.path} has no val shards (build with --val-fraction > 0)")
        sets[entry.name] = [source]
    return sets


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


def readers_per_rank(num_workers: int) -> int:
    """Data readers on each rank: the DataLoader workers, or the rank itself when ``num_workers`` is 0."""
    return max(1, num_workers)


def check_readers(sources: list[Source], world_size: int, num_workers: int) -> None:
    """Train sources: every one of the ``world_size x readers`` readers must get documents in every epoch.

    A source with fewer shards than readers has each shard shared by up to ``ceil(readers / shards)``
    readers (``bigtx.data.stream.doc_share``), so every shard needs at least that many documents.
    Checked from the index's sample counts; shards from a pattern carry none and are checked as they
    are read. Raises ``DataError`` naming the source, the counts and the fix."""
    readers = world_size * readers_per_rank(num_workers)
    layout = f"world size {world_size} x {readers_per_rank(num_workers)} per rank from data.num_workers"
    for src in sources:
        shared_by = -(-readers // len(src.shards))
        if shared_by <= 1 or any(s.samples is None for s in src.shards):
            continue
        small = min(src.shards, key=lambda s: s.samples or 0)
        if (small.samples or 0) < shared_by:
            raise DataError(
                f"{src.label}: {src.index_path or src.spec} has {len(src.shards)} train shard(s) for {readers} "
                f"readers ({layout}), so up to {shared_by} readers share a shard, but {small.name} holds only "
                f"{small.samples} document(s) and every reader needs one: lower data.num_workers or the number "
                "of ranks, or train on more data"
            )


def check_tokenizer(tokenizer_spec: str, vocab_size: int) -> Tokenizer:
    tok = load_tokenizer(tokenizer_spec)
    if tok.vocab_size > vocab_size:
        raise DataError(
            f"data.tokenizer: its vocabulary has {tok.vocab_size} tokens, more than model.vocab_size={vocab_size}; "
            f"raise model.vocab_size to at least {tok.vocab_size} (a multiple of 64: {-(-tok.vocab_size // 64) * 64})"
        )
    return tok


def check_data(spec_data, vocab_size: int, world_size: int = 1) -> None:
    """Every check ``build_loader`` does eagerly, without building loaders: tokenizer, paths, index, hashes,
    enough train documents for the ``world_size`` ranks' readers.

    The val split is only checked when ``data.val`` is set explicitly (otherwise it is optional).
    Raises ``DataError`` whose message starts with the field at fault.
    """
    tok = check_tokenizer(spec_data.tokenizer, vocab_size)
    train = split_sources(spec_data, "train")
    check_sources(train, tok, spec_data.tokenizer, vocab_size)
    check_readers(train, world_size, spec_data.num_workers)
    if spec_data.val is not None:
        for sources in val_sets(spec_data).values():
            check_sources(sources, tok, spec_data.tokenizer, vocab_size)

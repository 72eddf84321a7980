"""A hostile or damaged ``index.json`` (local or remote) gives a ``DataError`` naming the spec field, the
index and the bad value: shard names never leave the dataset directory, and no KeyError/TypeError escapes."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from bigtx.config.spec import DataSection
from bigtx.data import DataError, build_loader, check_data
from bigtx.data.build import build_shards
from bigtx.data.sources import resolve_source
from tests.unit.http_cases import Answer, http_server


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """urllib would send requests for 127.0.0.1 to a proxy named in the environment."""
    for var in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("index")
    os.makedirs(root / "in")
    for i in range(40):
        (root / "in" / f"doc{i:03d}.txt").write_text(f"document {i} " + "lorem ipsum " * (i % 5 + 1))
    build_shards([str(root / "in")], "byte", str(root / "ds"), shard_size=2048, val_fraction=0.25, progress=False)
    index = json.loads(Path(root / "ds" / "index.json").read_text())
    assert index["splits"]["train"]["shards"] and index["splits"]["val"]["shards"]
    return root / "ds"


@pytest.fixture
def ds(built, tmp_path):
    return shutil.copytree(built, tmp_path / "ds")


def edit_index(ds, change) -> str:
    path = os.path.join(ds, "index.json")
    index = json.loads(Path(path).read_text())
    change(index)
    with open(path, "w") as f:
        json.dump(index, f)
    return path


def set_entry(split, key, value):
    def change(index):
        index["splits"][split]["shards"][0][key] = value

    return change


def expect(section: DataSection, *parts: str, split: str = "train") -> None:
    """Both the eager check and the loader refuse ``section`` with a message containing ``parts``."""
    pattern = ".*".join(re.escape(p) for p in parts)
    for call in (
        lambda: check_data(section, 512),
        lambda: build_loader(section, split, seq_len=8, micro_batch_size=1, vocab_size=512),
    ):
        with pytest.raises(DataError, match=pattern) as err:
            call()
        assert str(err.value).startswith(parts[0])


@pytest.mark.parametrize(
    "name, why",
    [
        ("/etc/passwd", "is an absolute path"),
        ("../outside.tar", "has a '..' component"),
        ("sub/../../outside.tar", "has a '..' component"),
        ("..", "has a '..' component"),
        ("", "is empty"),
        ("..\\outside.tar", "contains a backslash"),
        ("C:\\shards\\x.tar", "contains a backslash"),
        ("c:x.tar", "contains ':'"),
        ("http://evil.example/x.tar", "contains ':'"),
        ("pipe:rm -rf x", "contains ':'"),
        ("x\0.tar", "contains a control character"),
        ("x\n.tar", "contains a control character"),
        (5, "is a int, not a string"),
        (None, "is a NoneType, not a string"),
        (["x.tar"], "is a list, not a string"),
    ],
)
def test_shard_names_must_stay_inside_the_dataset_directory(ds, name, why):
    path = edit_index(ds, set_entry("train", "name", name))
    expect(DataSection(train=str(ds)), "data.train: ", path, f"splits.train.shards[0].name {name!r} {why}")


def test_bad_val_shard_name_names_data_val(ds):
    path = edit_index(ds, set_entry("val", "name", "../../etc/shadow"))
    section = DataSection(train=str(ds), val=str(ds))
    expect(section, "data.val: ", path, "splits.val.shards[0].name '../../etc/shadow'", split="val")


def test_a_good_subdirectory_name_is_allowed(ds):
    """Names may have directories, as long as they stay inside."""
    index = json.loads(Path(os.path.join(ds, "index.json")).read_text())
    first = index["splits"]["train"]["shards"][0]["name"]
    os.makedirs(os.path.join(ds, "sub"))
    os.rename(os.path.join(ds, first), os.path.join(ds, "sub", first))
    edit_index(ds, set_entry("train", "name", f"sub/{first}"))
    source = resolve_source(str(ds), "train", "data.train")
    assert source.shards[0].url == os.path.join(str(ds), "sub", first)
    check_data(DataSection(train=str(ds)), 512)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("sha256", "abc", "splits.train.shards[0].sha256 'abc' is not 64 lower-case hex digits"),
        ("sha256", 12, "splits.train.shards[0].sha256 12 is not 64"),
        ("sha256", "A" * 64, "is not 64 lower-case hex digits"),
        ("samples", -1, "splits.train.shards[0].samples is -1, not a non-negative integer"),
        ("samples", "5", "splits.train.shards[0].samples is '5', not a non-negative integer"),
        ("samples", True, "samples is True, not a non-negative integer"),
        ("tokens", 1.5, "splits.train.shards[0].tokens is 1.5, not"),
        ("bytes", None, "splits.train.shards[0].bytes is None, not"),
    ],
)
def test_bad_shard_entry_fields(ds, key, value, message):
    path = edit_index(ds, set_entry("train", key, value))
    expect(DataSection(train=str(ds)), "data.train: ", path, message)


def replace(key, value):
    def change(index):
        index[key] = value

    return change


def replace_split(value):
    def change(index):
        index["splits"]["train"] = value

    return change


@pytest.mark.parametrize(
    "change, message",
    [
        (replace("splits", []), "'splits' is not a mapping of split names to shard lists"),
        (lambda index: index.pop("splits"), "'splits' is not a mapping"),
        (replace_split([]), "splits.train is not a mapping"),
        (replace_split({"shards": {"a": 1}}), "splits.train is not a mapping whose 'shards' is a list"),
        (replace_split({"shards": [5]}), "splits.train.shards[0] is not a mapping"),
        (replace("tokenizer", "byte"), "'tokenizer' is not a mapping"),
        (replace("vocab_size", "big"), "'vocab_size' is 'big', not a non-negative integer"),
    ],
)
def test_bad_index_structure(ds, change, message):
    path = edit_index(ds, change)
    expect(DataSection(train=str(ds)), "data.train: ", path, message)


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"[" * 100000 + b"]" * 100000, "is not valid JSON"),  # nested too deeply for the parser
        (b"\xff\xfe{}", "is not valid JSON"),
        (b"{", "is not valid JSON"),
    ],
)
def test_unreadable_index_json(ds, raw, message):
    path = os.path.join(ds, "index.json")
    with open(path, "wb") as f:
        f.write(raw)
    expect(DataSection(train=str(ds)), "data.train: ", path, message)


def remote_index(built, names: list) -> bytes:
    index = json.loads(Path(os.path.join(built, "index.json")).read_text())
    shards = index["splits"]["train"]["shards"]
    for entry, name in zip(shards, names):
        entry["name"] = name
    return json.dumps(index).encode()


@pytest.mark.parametrize(
    "name, why",
    [
        ("../other/x.tar", "has a '..' component"),
        ("/x.tar", "is an absolute path"),
        ("http://evil.example/x.tar", "contains ':'"),
        ("%2e%2e/x.tar", "has characters other than"),
        ("x.tar?sig=1", "has characters other than"),
        ("x.tar#", "has characters other than"),
        ("x y.tar", "has characters other than"),
    ],
)
def test_remote_index_names_stay_under_its_url(built, name, why):
    with http_server({"/ds/index.json": [Answer(200, remote_index(built, [name]))]}) as srv:
        url = srv.url + "/ds/index.json"
        message = f"data.train: {url}: splits.train.shards[0].name {name!r} {why}"
        with pytest.raises(DataError, match=re.escape(message)):
            resolve_source(url, "train", "data.train")


def test_remote_index_gives_shard_urls_next_to_it_and_is_fetched_with_retries(built):
    body = remote_index(built, [])
    with http_server({"/ds/index.json": [Answer(503), Answer(200, body)]}) as srv:
        source = resolve_source(srv.url + "/ds/index.json", "train", "data.train")
        assert srv.count("/ds/index.json") == 2  # one retry, after the default 1 s
    names = [s["name"] for s in json.loads(body)["splits"]["train"]["shards"]]
    assert [s.url for s in source.shards] == [f"{srv.url}/ds/{n}" for n in names]


def test_missing_remote_index_is_named(built):
    with http_server({}) as srv:
        url = srv.url + "/ds/index.json"
        with pytest.raises(DataError, match=re.escape(f"data.train: cannot read {url}: HTTP 404 Not Found")):
            resolve_source(url, "train", "data.train")
        assert srv.count("/ds/index.json") == 1


def test_names_from_a_pipe_index_never_reach_the_shell(ds, tmp_path):
    marker = tmp_path / "ran"
    name = f"x.tar; touch {marker}"
    edit_index(ds, set_entry("train", "name", name))
    spec = f"pipe:cat {ds}/index.json"
    message = f"data.train: {spec}: splits.train.shards[0].name {name!r} has characters other than"
    with pytest.raises(DataError, match=re.escape(message)):
        loader = build_loader(DataSection(train=spec), seq_len=8, micro_batch_size=1, vocab_size=512)
        next(iter(loader))  # would run the shard's pipe: command
    assert not marker.exists()

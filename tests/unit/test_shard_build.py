"""The shard builder: inputs, the sample format, index.json, determinism, plain-WebDataset output, the CLI."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from bigtx.cli.main import main
from bigtx.data import DataError
from bigtx.data.build import AUTO_SHARDS, auto_shard_size, build_shards, parse_size, split_of
from bigtx.data.shards import ShardSetWriter, ids_dtype, npy_bytes, read_shard, ustar_header

EOS = 256


def make_inputs(root) -> dict[str, str]:
    """Plain text, .txt.gz, .jsonl and .jsonl.gz inputs; returns {source: text} of every document."""
    root.mkdir(parents=True, exist_ok=True)
    docs: dict[str, str] = {}
    for i in range(8):
        text = f"plain document {i} " + "word " * (i * 13 + 5)
        (root / f"t{i}.txt").write_text(text)
        docs[str(root / f"t{i}.txt")] = text
    with gzip.open(root / "z.txt.gz", "wt") as f:
        f.write("a gzipped plain document")
    docs[str(root / "z.txt.gz")] = "a gzipped plain document"
    with open(root / "j.jsonl", "w") as f:
        for i in range(30):
            text = f"json line {i} é " + "x" * (i * 7)
            f.write(json.dumps({"text": text, "id": i}) + "\n")
            docs[f"{root / 'j.jsonl'}:{i + 1}"] = text
    with gzip.open(root / "k.jsonl.gz", "wt") as f:
        for i in range(20):
            text = f"gz json {i} " + "y" * i
            f.write(json.dumps({"text": text}) + "\n")
            docs[f"{root / 'k.jsonl.gz'}:{i + 1}"] = text
    return docs


def read_all(out: str, index: dict) -> dict[str, list[int]]:
    """{source: ids} of every sample in every shard, read with webdataset itself."""
    found = {}
    for split in ("train", "val"):
        urls = [os.path.join(out, s["name"]) for s in index["splits"][split]["shards"]]
        if not urls:
            continue
        for sample in wds.WebDataset(urls, shardshuffle=False).decode():
            assert sample["ids.npy"].dtype == np.dtype(index["dtype"])
            found[sample["source.txt"]] = sample["ids.npy"].tolist()
    return found


def test_build_reads_every_input_kind_and_writes_a_complete_index(tmp_path):
    docs = make_inputs(tmp_path / "in")
    out = str(tmp_path / "ds")
    index = build_shards([str(tmp_path / "in")], "byte", out, shard_size=4096, val_fraction=0.2, progress=False)
    assert index["dtype"] == "uint16" and index["vocab_size"] == 258
    assert index["tokenizer"]["source"] == "byte" and len(index["tokenizer"]["sha256"]) == 64
    assert index["stats"]["documents"] == len(docs)
    train, val = index["splits"]["train"], index["splits"]["val"]
    assert train["samples"] + val["samples"] == len(docs) and val["samples"] > 0
    assert len(train["shards"]) > 3
    for split in (train, val):
        assert split["tokens"] == sum(s["tokens"] for s in split["shards"])
        for s in split["shards"]:
            raw = Path(os.path.join(out, s["name"])).read_bytes()
            assert hashlib.sha256(raw).hexdigest() == s["sha256"] and len(raw) == s["bytes"]
            assert s["bytes"] <= 4096 + 10240  # one record of tar padding at most over the limit
    found = read_all(out, index)
    assert set(found) == set(docs)
    for source, ids in found.items():
        assert ids[-1] == EOS and EOS not in ids[:-1]
        assert bytes(ids[:-1]).decode("utf-8") == docs[source]
    # the val split is a function of the text only
    val_sources = set(read_all(out, {**index, "splits": {"train": {"shards": []}, "val": val}}))
    assert val_sources == {source for source, text in docs.items() if split_of(text, 0.2) == "val"}


def test_output_is_byte_identical_across_runs_and_worker_counts(tmp_path):
    make_inputs(tmp_path / "in")
    outs = []
    for name, workers in (("a", 1), ("b", 2), ("c", 1)):
        out = tmp_path / name
        build_shards([str(tmp_path / "in")], "byte", str(out), shard_size=4096, workers=workers, progress=False)
        outs.append({p: (out / p).read_bytes() for p in sorted(os.listdir(out))})
    assert outs[0] == outs[1] == outs[2]


def test_shards_are_plain_tar(tmp_path):
    make_inputs(tmp_path / "in")
    out = tmp_path / "ds"
    build_shards([str(tmp_path / "in" / "j.jsonl")], "byte", str(out), val_fraction=0, progress=False)
    listing = subprocess.run(["tar", "tvf", str(out / "train-000000.tar")], capture_output=True, text=True, check=True)
    lines = listing.stdout.splitlines()
    assert lines[0].split()[-1] == "0000000000.ids.npy" and lines[1].split()[-1] == "0000000000.source.txt"
    assert all(line.startswith("-r--r--r-- 0/0") and "1970-01-01" in line for line in lines)
    assert not os.path.exists(out / "val-000000.tar")


def _tarfile_member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o444, 0, 0, "", ""
    return info


def test_shards_are_byte_for_byte_what_tarfile_writes(tmp_path):
    """The writer forms its ustar headers itself; its shards equal tarfile's archive of the same members,
    end-of-archive record padding included."""
    rng = np.random.default_rng(0)
    docs = [(f"{i:010d}", rng.integers(0, 320, int(rng.integers(1, 700))), f"in/f{i % 3}.txt:{i}") for i in range(40)]
    writer = ShardSetWriter(str(tmp_path), "train", 1 << 30, np.uint16)
    for key, ids, source in docs:
        writer.write(key, ids, source)
    (entry,) = writer.close()
    reference = tmp_path / "reference.tar"
    with tarfile.open(reference, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, ids, source in docs:
            for name, data in (
                (f"{key}.ids.npy", npy_bytes(ids.astype(np.uint16))),
                (f"{key}.source.txt", source.encode()),
            ):
                tar.addfile(_tarfile_member(name, len(data)), io.BytesIO(data))
    written = (tmp_path / entry["name"]).read_bytes()
    assert written == reference.read_bytes()
    assert entry["bytes"] == len(written) and entry["sha256"] == hashlib.sha256(written).hexdigest()


def test_ustar_header_is_tarfiles_for_any_name_and_size():
    rng = random.Random(0)
    for _ in range(2000):
        name = "".join(rng.choice("abc019_-é") for _ in range(rng.randint(1, 40))) + rng.choice([".ids.npy", ".txt"])
        size = rng.choice([0, 1, 511, 512, 513, rng.randint(0, 8**11 - 1), 8**11 - 1])
        expected = _tarfile_member(name, size).tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
        assert ustar_header(name, size) == expected, (name, size)


@pytest.mark.parametrize(
    ("name", "size", "match"),
    [("k" * 101, 1, "longer than 100 bytes"), ("é" * 51, 1, "longer than 100 bytes"), ("k", 8**11, "do not fit")],
)
def test_ustar_header_refuses_what_ustar_cannot_hold(name, size, match):
    with pytest.raises(ValueError, match=match):
        ustar_header(name, size)


def test_uint32_when_the_vocabulary_needs_it(tmp_path):
    assert ids_dtype(65536) == np.uint16 and ids_dtype(65537) == np.uint32
    writer = ShardSetWriter(str(tmp_path), "train", 1 << 20, ids_dtype(100_000))
    writer.write("k0", np.array([5, 99_999, 70_000], dtype=np.int64), "src")
    (entry,) = writer.close()
    data = read_shard(str(tmp_path / entry["name"]), entry["sha256"], 1, entry["bytes"])
    assert data.docs[0].dtype == np.uint32 and data.docs[0].tolist() == [5, 99_999, 70_000]


def test_bad_input_is_counted_or_refused(tmp_path, caplog):
    root = tmp_path / "in"
    root.mkdir()
    (root / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (root / "empty.txt").write_text("   \n")
    with open(root / "mixed.jsonl", "w") as f:
        f.write('{"text": "fine"}\n')
        f.write("not json\n")
        f.write('{"body": "wrong field"}\n')
        f.write('{"text": 42}\n')
        f.write('{"text": ""}\n')
        f.write('{"text": "lone surrogate \\ud800 here"}\n')
    index = build_shards([str(root)], "byte", str(tmp_path / "ds"), val_fraction=0, progress=False)
    stats = index["stats"]
    assert stats["documents"] == 3 and stats["empty_docs_skipped"] == 2
    assert stats["non_utf8_docs"] == 2 and stats["bad_lines_skipped"] == 3
    texts = {bytes(ids[:-1]).decode() for ids in read_all(str(tmp_path / "ds"), index).values()}
    assert texts == {"caf\ufffd au lait", "fine", "lone surrogate \ufffd here"}
    assert any("mixed.jsonl:2" in r.getMessage() for r in caplog.records)


def test_text_field_option(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"content": "hello"}\n{"content": "world"}\n')
    index = build_shards(
        [str(tmp_path / "a.jsonl")], "byte", str(tmp_path / "ds"), text_field="content", val_fraction=0, progress=False
    )
    assert index["splits"]["train"]["samples"] == 2


@pytest.mark.parametrize(
    "inputs, match",
    [
        (["NOPE*.txt"], "matches no files"),
        (["NOPE.txt"], "no such file or directory"),
        (["EMPTY"], "no documents in 1 file"),
        (["GZ"], "cannot read"),
    ],
)
def test_build_errors(tmp_path, inputs, match):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "broken.txt.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    paths = {"EMPTY": str(tmp_path / "empty.txt"), "GZ": str(tmp_path / "broken.txt.gz")}
    inputs = [paths.get(p, str(tmp_path / p)) for p in inputs]
    with pytest.raises(DataError, match=match):
        build_shards(inputs, "byte", str(tmp_path / "ds"), progress=False)


def test_auto_shard_size_rule():
    # train bytes = input x shard bytes per text byte x (1 - val fraction), cut into AUTO_SHARDS
    assert AUTO_SHARDS == 32
    assert auto_shard_size(32 * 10**6, 2.0, 0.5) == 10**6
    assert auto_shard_size(1000, 2.0, 0.0) == 4096  # never below the 4 KiB minimum
    assert auto_shard_size(10**12, 0.5, 0.01) == 64 * 10**6  # large inputs: the 64 MB shards as before


def test_small_input_gets_several_shards_unless_a_size_is_given(tmp_path, capsys):
    """9,000 documents (0.66 MB of text): one 64 MB shard before; now about AUTO_SHARDS, the same every time."""
    root = tmp_path / "in"
    root.mkdir()
    with open(root / "docs.jsonl", "w") as f:
        for i in range(9000):
            f.write(json.dumps({"text": f"document {i} " + "lorem ipsum " * (i % 11)}) + "\n")
    args = ["data", "build", "--input", str(root), "--tokenizer", "byte", "--workers", "1", "--val-fraction", "0.01"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert "chosen for about 32 train shards (--shard-size sets it)" in capsys.readouterr().out
    index = json.loads((tmp_path / "a" / "index.json").read_text())
    train = index["splits"]["train"]["shards"]
    assert len(train) == 27  # not quite 32: the estimate counts the jsonl syntax (~15% here) as text
    assert index["options"]["shard_size_auto"] is True
    assert max(s["bytes"] for s in train) <= index["options"]["shard_size"] + 10240
    assert main([*args, "--out", str(tmp_path / "b"), "--workers", "2"]) == 0  # deterministic, any worker count
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "c"), "--shard-size", "64MB"]) == 0  # an explicit size is kept
    explicit = json.loads((tmp_path / "c" / "index.json").read_text())
    assert len(explicit["splits"]["train"]["shards"]) == 1
    assert explicit["options"]["shard_size"] == 64 * 10**6 and explicit["options"]["shard_size_auto"] is False
    assert "chosen for about" not in capsys.readouterr().out


def test_parse_size():
    assert parse_size("64MB") == 64_000_000 and parse_size("1.5GiB") == 3 << 29 and parse_size("8192") == 8192
    for bad in ("12 parsecs", "1KB", ""):
        with pytest.raises(DataError, match="--shard-size"):
            parse_size(bad)


def test_cli_build_inspect_and_errors(tmp_path, capsys):
    make_inputs(tmp_path / "in")
    out = str(tmp_path / "ds")
    args = ["data", "build", "--input", str(tmp_path / "in" / "*.txt"), str(tmp_path / "in" / "*.jsonl*")]
    args += ["--tokenizer", "byte", "--out", out, "--shard-size", "8KB", "--workers", "1", "--val-fraction", "0.1"]
    assert main(args) == 0
    assert "58 documents" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(args)  # the directory is not empty
    assert exc.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    capsys.readouterr()
    assert main(["data", "inspect", out, "--samples", "2", "--verify"]) == 0
    text = capsys.readouterr().out
    assert "train-000000.tar" in text and "all shards ok" in text and "plain document 0 word" in text
    with open(os.path.join(out, "train-000001.tar"), "r+b") as f:
        f.truncate(1000)
    assert main(["data", "inspect", out, "--verify"]) == 1
    assert "BAD: truncated" in capsys.readouterr().out
    for bad in (
        ["data", "inspect", str(tmp_path)],
        ["data", "build", "--input", "x", "--tokenizer", "nope", "--out", "y"],
    ):
        with pytest.raises(SystemExit) as exc:
            main(bad)
        assert exc.value.code == 2
        assert capsys.readouterr().err.startswith("bigtx: error: ")


def test_cli_help_runs_as_a_subprocess():
    bigtx = os.path.join(os.path.dirname(os.path.realpath(__file__)), "..", "..", ".venv", "bin", "bigtx")
    if not os.path.exists(bigtx):
        pytest.skip("no .venv/bin/bigtx")
    for cmd in (["data", "build"], ["data", "inspect"], ["tokenizer", "train"]):
        res = subprocess.run([bigtx, *cmd, "--help"], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and "usage: bigtx" in res.stdout


# --- what --overwrite may remove --------------------------------------------------------------------


def snapshot(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def build_small(inputs, out, **kw):
    return build_shards([str(i) for i in inputs], "byte", str(out), val_fraction=0, progress=False, **kw)


def test_overwrite_replaces_the_previous_build_and_nothing_else(tmp_path):
    make_inputs(tmp_path / "in")
    out = tmp_path / "ds"
    first = build_small([tmp_path / "in"], out, shard_size=4096)
    assert len(first["splits"]["train"]["shards"]) > 3
    others = {"notes.txt": b"mine", "train-1.tar": b"not a shard name", "val-000001.tar.bak": b"backup"}
    for name, data in others.items():
        (out / name).write_bytes(data)
    (out / "sub").mkdir()
    (out / "sub" / "train-000000.tar").write_bytes(b"nested, not ours")
    second = build_small([tmp_path / "in" / "j.jsonl"], out, shard_size=1 << 20, overwrite=True)
    assert [s["name"] for s in second["splits"]["train"]["shards"]] == ["train-000000.tar"]
    shards = {p.name for p in out.glob("*-0*.tar")}
    assert shards == {"train-000000.tar"}  # the first build's extra shards are gone
    for name, data in others.items():
        assert (out / name).read_bytes() == data
    assert (out / "sub" / "train-000000.tar").read_bytes() == b"nested, not ours"
    assert json.loads((out / "index.json").read_text())["stats"]["documents"] == 30


@pytest.mark.parametrize("overwrite", [False, True])
def test_shard_named_files_no_index_lists_are_never_removed(tmp_path, overwrite):
    make_inputs(tmp_path / "in")
    out = tmp_path / "ds"
    out.mkdir()
    (out / "val-000003.tar").write_bytes(b"someone else's tar")  # or an interrupted build: no index yet
    before = snapshot(out)
    with pytest.raises(DataError, match=r"holds val-000003\.tar, which no bigtx index\.json there lists"):
        build_small([tmp_path / "in"], out, overwrite=overwrite)
    assert snapshot(out) == before
    # beside a bigtx index that does not list it
    (out / "val-000003.tar").unlink()
    build_small([tmp_path / "in" / "j.jsonl"], out)
    (out / "train-000042.tar").write_bytes(b"not listed")
    before = snapshot(out)
    with pytest.raises(DataError, match=r"holds train-000042\.tar, which no bigtx index\.json there lists"):
        build_small([tmp_path / "in"], out, overwrite=overwrite)
    assert snapshot(out) == before


@pytest.mark.parametrize(
    "index, match",
    [
        (b'{"format": "something-else", "splits": {}}', r'index\.json is not a `bigtx data build` index \(no "format"'),
        (b"not json at all", r"index\.json is not a `bigtx data build` index \(Expecting value"),
        (b"\xff\xfe binary", r"index\.json is not a `bigtx data build` index"),
        (b'{"format": "bigtx-shards", "splits": {"train": {}}}', r"its splits list no shards"),
        (b'{"format": "bigtx-shards", "splits": {"train": {"shards": [{"name": "../keep.txt"}]}}}', "lists files"),
        (b'{"format": "bigtx-shards", "splits": {"train": {"shards": [{"name": "notes.txt"}]}}}', "lists files"),
    ],
)
def test_a_foreign_or_hostile_index_is_refused_and_nothing_is_removed(tmp_path, index, match):
    make_inputs(tmp_path / "in")
    out = tmp_path / "ds"
    out.mkdir()
    (out / "index.json").write_bytes(index)
    (out / "notes.txt").write_text("mine")
    (tmp_path / "keep.txt").write_text("outside")
    before, outside = snapshot(out), (tmp_path / "keep.txt").read_bytes()
    with pytest.raises(DataError, match=match):
        build_small([tmp_path / "in"], out, overwrite=True)
    assert snapshot(out) == before and (tmp_path / "keep.txt").read_bytes() == outside


def test_inputs_the_build_would_replace_are_refused(tmp_path):
    make_inputs(tmp_path / "in")
    out = tmp_path / "in"  # building into the input directory itself is fine ...
    build_small([tmp_path / "in" / "j.jsonl"], out)
    before = snapshot(out)
    # ... but not reading the previous build's files while --overwrite removes them
    with pytest.raises(DataError, match=r"--input .*/in/index\.json: is .*, which this build would remove"):
        build_small([tmp_path / "in"], out, overwrite=True)
    with pytest.raises(DataError, match=r"--input .*train-000000\.tar: is .*, which this build would remove"):
        build_small([tmp_path / "in" / "train-*.tar"], out, overwrite=True)
    with pytest.raises(DataError, match=r"index\.json: is .*index\.json, which this build would remove"):
        build_small([tmp_path / "in" / "index.json"], out, overwrite=True)
    # nor through a link that leads there
    (tmp_path / "link.txt").symlink_to(out / "index.json")
    with pytest.raises(DataError, match=r"link\.txt: is .*index\.json, which this build would remove"):
        build_small([tmp_path / "link.txt"], tmp_path / "in", overwrite=True)
    assert snapshot(out) == before


def test_out_that_is_a_file_is_refused(tmp_path):
    make_inputs(tmp_path / "in")
    (tmp_path / "ds").write_text("a file")
    with pytest.raises(DataError, match=r"^--out: .*ds is a file, not a directory$"):
        build_small([tmp_path / "in"], tmp_path / "ds", overwrite=True)
    assert (tmp_path / "ds").read_text() == "a file"


def test_cli_refuses_to_remove_files_it_did_not_write(tmp_path, capsys):
    make_inputs(tmp_path / "in")
    out = tmp_path / "ds"
    out.mkdir()
    (out / "train-000000.tar").write_bytes(b"precious")
    args = ["data", "build", "--input", str(tmp_path / "in"), "--tokenizer", "byte", "--out", str(out)]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--workers", "1", "--overwrite", "--no-progress"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("bigtx: error: --out: ") and "refusing to remove" in err
    assert (out / "train-000000.tar").read_bytes() == b"precious" and not (out / "index.json").exists()


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "../outside.tar"}, "has a '..' component"),
        ({"name": "/etc/passwd"}, "shard names must be relative paths"),
        ({"name": "train-000000.tar", "sha256": 5}, "is not 64 lower-case hex digits"),
        ({"name": "train-000000.tar", "samples": -1}, "not a non-negative integer"),
        ("not a mapping", "is not a mapping"),
    ],
)
def test_inspect_refuses_a_hostile_index(tmp_path, capsys, entry, message):
    """`bigtx data inspect` reads an index with the loader's checks: exit 2 and a clear message, no
    traceback, and nothing outside the directory is read."""
    make_inputs(tmp_path / "in")
    out = tmp_path / "ds"
    build = ["data", "build", "--input", str(tmp_path / "in" / "*.txt"), "--tokenizer", "byte", "--out", str(out)]
    assert main([*build, "--workers", "1", "--val-fraction", "0"]) == 0
    index = json.loads((out / "index.json").read_text())
    index["splits"]["train"]["shards"][0] = entry
    (out / "index.json").write_text(json.dumps(index))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["data", "inspect", str(out), "--verify"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "Traceback" not in err

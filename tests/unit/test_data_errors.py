"""Bad input to the loader: corrupt, truncated, missing and mismatching shards; bad ids; bad specs.

Every case ends in a clear ``DataError`` or a counted, logged skip; none crashes or passes garbage.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from bigtx.config.spec import DataSection
from bigtx.data import DataError, build_loader, build_val_loaders, check_data
from bigtx.data.build import build_shards
from bigtx.data.tokenizer import train_tokenizer

EOS = 256


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    os.makedirs(root / "in")
    for i in range(60):
        (root / "in" / f"doc{i:03d}.txt").write_text(f"document {i} " + "lorem ipsum " * (i % 7 + 1))
    out = root / "ds"
    build_shards([str(root / "in")], "byte", str(out), shard_size=4096, val_fraction=0.1, progress=False)
    return out


@pytest.fixture
def ds(built, tmp_path):
    """A private copy of the built directory, free to damage."""
    return shutil.copytree(built, tmp_path / "ds")


def loader(train, *, nw=0, ws=1, vocab_size=512, **kw):
    section = DataSection(train=train, num_workers=nw, **kw)
    return build_loader(section, "train", seq_len=8, micro_batch_size=2, world_size=ws, seed=1, vocab_size=vocab_size)


def run(ld, n=200):
    it = iter(ld)
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def shard(ds, i=0):
    return os.path.join(ds, f"train-{i:06d}.tar")


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(1300)  # inside the first sample (tar pads the end with zeros: a cut there loses nothing)


def flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.parametrize(
    "damage, reason",
    [
        (truncate, "truncated"),
        (lambda p: flip(p, 700), "sha256 mismatch"),  # inside a member's data: only the index hash sees it
        (os.remove, "cannot read"),  # gone after the loader was built
    ],
)
def test_bad_shard_is_skipped_warned_and_counted(ds, caplog, damage, reason):
    ld = loader(str(ds))
    damage(shard(ds, 1))
    with caplog.at_level(logging.WARNING, logger="bigtx.data"):
        batches = run(ld)
    assert len(batches) == 200
    assert ld.stats()["bad_shards"] >= 1
    messages = [r.getMessage() for r in caplog.records]
    assert any("train-000001.tar" in m and reason in m for m in messages), messages


def test_bad_shard_raises_with_on_error_raise(ds):
    truncate(shard(ds, 2))
    with pytest.raises(DataError, match=r"data.train: shard .*train-000002.tar: truncated"):
        run(loader(str(ds), on_error="raise"))


def test_bad_shard_in_a_worker_raises_in_the_main_process(ds):
    truncate(shard(ds, 0))
    with pytest.raises(DataError, match="train-000000.tar"):
        run(loader(str(ds), nw=2, on_error="raise"))


def test_corrupt_header_without_index_is_detected(ds):
    n = len(json.loads(Path(os.path.join(ds, "index.json")).read_text())["splits"]["train"]["shards"])
    flip(shard(ds, 0), 130)  # the size field of the first header
    pattern = os.path.join(ds, f"train-{{000000..{n - 1:06d}}}.tar")
    with pytest.raises(DataError, match="bad tar header"):
        run(loader(pattern, on_error="raise"))
    ld = loader(pattern)
    run(ld)
    assert ld.stats()["bad_shards"] >= 1


def test_truncated_shard_without_index(ds):
    n = len(json.loads(Path(os.path.join(ds, "index.json")).read_text())["splits"]["train"]["shards"])
    truncate(shard(ds, 3))
    with pytest.raises(DataError, match="train-000003.tar: truncated"):
        run(loader(os.path.join(ds, f"train-{{000000..{n - 1:06d}}}.tar"), on_error="raise"))


def test_failing_pipe_is_a_bad_shard(ds):
    pattern = f"pipe:cat {shard(ds, 0)}::pipe:cat {ds}/no-such-file.tar"
    with pytest.raises(DataError, match="no-such-file.tar"):
        run(loader(pattern, on_error="raise"))


def test_all_shards_bad_stops_instead_of_spinning(ds):
    ld = loader(str(ds))
    for name in os.listdir(ds):
        if name.startswith("train-"):
            truncate(os.path.join(ds, name))
    with pytest.raises(DataError, match="no usable document"):
        run(ld)


def write_wds(tmp_path, docs, name="w"):
    with wds.TarWriter(str(tmp_path / f"{name}.tar")) as sink:
        for i, d in enumerate(docs):
            sink.write({"__key__": f"d{i}", "ids.npy": d})
    return str(tmp_path / f"{name}.tar")


def test_empty_documents_are_skipped_and_counted(tmp_path):
    good = np.array([1, 2, 3, EOS], dtype=np.uint16)
    path = write_wds(tmp_path, [good, np.zeros(0, np.uint16), np.array([EOS], np.uint16), good])
    ld = loader(path)
    batches = run(ld, 20)
    assert ld.stats()["skipped_docs"] >= 2
    assert all(int(x.max()) <= EOS for x, _ in batches)


@pytest.mark.parametrize("bad", [np.array([5, 300, EOS], np.uint16), np.array([5, -1, EOS], np.int32)])
def test_ids_outside_the_vocabulary(tmp_path, caplog, bad):
    good = np.array([1, 2, 3, EOS], dtype=np.uint16)
    path = write_wds(tmp_path, [good, bad, good])
    ld = loader(path)
    with caplog.at_level(logging.WARNING, logger="bigtx.data"):
        batches = run(ld, 20)
    assert ld.stats()["skipped_docs"] >= 1
    assert all(0 <= int(x.min()) and int(x.max()) < 258 for x, _ in batches)
    assert any("outside the 258-token vocabulary" in r.getMessage() for r in caplog.records)
    with pytest.raises(DataError, match="token id"):
        run(loader(path, on_error="raise"), 20)


def test_sample_without_ids_is_a_bad_shard(tmp_path):
    with wds.TarWriter(str(tmp_path / "x.tar")) as sink:
        sink.write({"__key__": "a", "txt": "hello"})
    with pytest.raises(DataError, match="none of the fields ids.npy"):
        run(loader(str(tmp_path / "x.tar"), on_error="raise"), 1)


def test_tokenizer_hash_mismatch_names_both_hashes(built, tmp_path):
    tok = train_tokenizer(["some text to train on, " * 20] * 10, 300, str(tmp_path / "tok.json"), min_frequency=1)
    index = json.loads(Path(os.path.join(built, "index.json")).read_text())
    section = DataSection(train=str(built), tokenizer=str(tmp_path / "tok.json"))
    for call in (
        lambda: check_data(section, 512),
        lambda: build_loader(section, seq_len=8, micro_batch_size=1, vocab_size=512),
    ):
        with pytest.raises(DataError) as err:
            call()
        assert str(err.value).startswith("data.train: ")
        assert index["tokenizer"]["sha256"] in str(err.value) and tok.sha256 in str(err.value)


@pytest.mark.parametrize(
    "section, field, match",
    [
        (dict(train=None), "data.train", "no training data"),
        (dict(train="/nonexistent/ds"), "data.train", "no such file or directory"),
        (dict(train="/nonexistent/train-{000..009}.tar"), "data.train", "10 of 10 shards do not exist"),
        (dict(train="/nonexistent/*.tar"), "data.train", "matches no files"),
        (dict(train="BUILT", tokenizer="/nonexistent/tokenizer.json"), "data.tokenizer", "no such file"),
        (dict(train=[{"path": "BUILT"}, {"path": "/nope"}]), "data.train[1].path", "no such file"),
        (dict(train="BUILT", val="/nonexistent"), "data.val", "no such file"),
    ],
)
def test_spec_errors_name_the_field(built, section, field, match):
    def fix(v):
        return str(built) if v == "BUILT" else v

    section = {
        k: [{**s, "path": fix(s["path"])} for s in v] if isinstance(v, list) else fix(v) for k, v in section.items()
    }
    spec = DataSection(**section)
    with pytest.raises(DataError, match=match) as err:
        check_data(spec, 512)
    assert str(err.value).startswith(field + ": ")
    with pytest.raises(DataError, match=match):
        build_loader(spec, "val" if field == "data.val" else "train", seq_len=8, micro_batch_size=1, vocab_size=512)


@pytest.mark.parametrize("bad, match", [("/nonexistent", "no such file or directory"), ("NOVAL", "has no val shards")])
def test_named_val_source_errors_name_the_entry(built, tmp_path, bad, match):
    if bad == "NOVAL":  # a built directory without a val split: its name's metric would silently be missing
        (tmp_path / "in").mkdir()
        (tmp_path / "in" / "a.txt").write_text("only training text " * 20)
        bad = str(tmp_path / "noval")
        build_shards([str(tmp_path / "in")], "byte", bad, shard_size=4096, val_fraction=0.0, progress=False)
    spec = DataSection(train=str(built), val=[{"name": "web", "path": str(built)}, {"name": "code", "path": bad}])
    for call in (
        lambda: check_data(spec, 512),
        lambda: build_val_loaders(spec, seq_len=8, micro_batch_size=1, vocab_size=512),
    ):
        with pytest.raises(DataError, match=match) as err:
            call()
        assert str(err.value).startswith("data.val[1].path: ")


def test_vocabulary_larger_than_the_model(built):
    with pytest.raises(DataError, match=r"^data.tokenizer: .*258 tokens, more than model.vocab_size=256"):
        check_data(DataSection(train=str(built)), 256)


def test_directory_without_index_and_missing_listed_shards(ds, tmp_path):
    os.makedirs(tmp_path / "plain")
    with pytest.raises(DataError, match="has no index.json"):
        check_data(DataSection(train=str(tmp_path / "plain")), 512)
    os.remove(shard(ds, 4))
    with pytest.raises(DataError, match=r"1 of the \d+ train shards listed in .* are missing"):
        check_data(DataSection(train=str(ds)), 512)
    (tmp_path / "plain" / "index.json").write_text('{"hello": 1}')
    with pytest.raises(DataError, match="not an index.json written by"):
        check_data(DataSection(train=str(tmp_path / "plain")), 512)


def test_a_pattern_shard_too_small_to_share_fails_on_the_reader_left_without_documents(tmp_path):
    # 1 shard, 4 readers: reader j takes documents j, j+4, ...; with 3 documents reader 3 gets none.
    # A pattern carries no sample counts, so this is found when the reader reads, not before.
    path = write_wds(tmp_path, [np.array([1, 2, EOS], np.uint16)] * 3)
    section = DataSection(train=path, num_workers=0)
    make = functools.partial(build_loader, section, seq_len=2, micro_batch_size=1, world_size=4, vocab_size=512)
    assert len(run(make(rank=2), 3)) == 3
    message = r"^data.train: reader 3 of 4 got no usable document from its share \(every 4th document\) of a shard"
    with pytest.raises(DataError, match=message):
        run(make(rank=3), 1)


def test_check_data_accepts_a_good_spec(built):
    check_data(DataSection(train=str(built)), 512)
    check_data(DataSection(train=str(built), val=str(built)), 512)

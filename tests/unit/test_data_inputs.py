"""Parquet, .jsonl.zst and Hugging Face datasets inputs to `bigtx data build`, and their bad-input cases.

Every file is written here with pyarrow / zstandard (no ``datasets``, no downloads)."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
import zstandard

from bigtx.cli.main import main
from bigtx.data import DataError
from bigtx.data.build import build_shards
from bigtx.data.inputs import ReadStats, Unit, expand_inputs, iter_documents, read_unit
from tests.unit.test_shard_build import read_all

TEXTS = [f"row {i} " + "text " * (i % 5) for i in range(25)]


def write_parquet(path, texts, row_group_size=10, **columns):
    table = pa.table({"text": texts, "n": list(range(len(texts))), **columns})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_arrow(path, table, batch=7):
    with pa.OSFile(str(path), "wb") as sink, ipc.new_stream(sink, table.schema) as writer:
        for b in table.to_batches(max_chunksize=batch):
            writer.write_batch(b)
    return path


def save_to_disk_dir(root, parts):
    """The layout datasets' save_to_disk writes: data-*.arrow (IPC stream), dataset_info.json, state.json."""
    root.mkdir(parents=True)
    names = [f"data-{i:05d}-of-{len(parts):05d}.arrow" for i in range(len(parts))]
    for name, texts in zip(names, parts):
        write_arrow(root / name, pa.table({"text": texts}))
    (root / "dataset_info.json").write_text(json.dumps({"features": {"text": {"dtype": "string"}}}))
    state = {"_data_files": [{"filename": n} for n in names], "_fingerprint": "x", "_split": None}
    (root / "state.json").write_text(json.dumps(state))
    return root


def docs(files, text_field="text"):
    stats = ReadStats()
    return list(iter_documents(files, stats, text_field)), stats


def test_parquet_rows_are_documents_read_by_row_group(tmp_path):
    path = str(write_parquet(tmp_path / "a.parquet", [*TEXTS[:3], None, "  ", *TEXTS[3:]]))
    assert pq.ParquetFile(path).metadata.num_row_groups == 3
    found, stats = docs([path])
    assert [t for _, t in found] == TEXTS
    assert found[0][0] == f"{path}:1" and found[3][0] == f"{path}:6"  # rows 4 (null) and 5 (blank) skipped
    assert (stats.documents, stats.bad_lines, stats.empty_docs, stats.files) == (25, 1, 1, 1)
    # a row-group range reads exactly those groups, rows still numbered in the file
    part = list(read_unit(Unit(path, "parquet", 1, 2), ReadStats()))
    assert [r for r, _ in part] == list(range(11, 21)) and part[0][1] == TEXTS[8]


def test_jsonl_zst_across_frames_and_text_field(tmp_path):
    lines = [json.dumps({"body": t}) + "\n" for t in TEXTS]
    cctx = zstandard.ZstdCompressor()
    with open(tmp_path / "a.jsonl.zst", "wb") as f:  # two frames, as pzstd or appended chunks write them
        f.write(cctx.compress("".join(lines[:10]).encode()))
        f.write(cctx.compress("".join(lines[10:]).encode()))
    (tmp_path / "b.txt.zst").write_bytes(cctx.compress(b"one zstd text document"))
    found, stats = docs([str(tmp_path / "a.jsonl.zst"), str(tmp_path / "b.txt.zst")], "body")
    assert [t for _, t in found] == [*TEXTS, "one zstd text document"]
    assert found[24][0] == f"{tmp_path / 'a.jsonl.zst'}:25" and stats.files == 2


def test_datasets_directory_is_read_in_state_json_order(tmp_path):
    ds = save_to_disk_dir(tmp_path / "hf", [TEXTS[:12], TEXTS[12:]])
    state = json.loads((ds / "state.json").read_text())
    state["_data_files"].reverse()  # the listed order wins over the name order
    (ds / "state.json").write_text(json.dumps(state))
    (tmp_path / "z.txt").write_text("after the dataset")
    files = expand_inputs([str(tmp_path)])
    assert [os.path.basename(p) for p in files] == ["data-00001-of-00002.arrow", "data-00000-of-00002.arrow", "z.txt"]
    found, _ = docs(files)
    assert [t for _, t in found] == [*TEXTS[12:], *TEXTS[:12], "after the dataset"]
    assert found[0][0] == f"{ds / 'data-00001-of-00002.arrow'}:1"
    # the Arrow IPC file format is read too
    with (
        pa.OSFile(str(tmp_path / "f.arrow"), "wb") as sink,
        ipc.new_file(sink, pa.schema([("text", pa.string())])) as w,
    ):
        w.write_table(pa.table({"text": TEXTS[:4]}))
    assert [t for _, t in docs([str(tmp_path / "f.arrow")])[0]] == TEXTS[:4]


def test_build_from_parquet_zst_and_dataset_inputs(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    write_parquet(root / "a.parquet", TEXTS)
    (root / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "zst line"}\n'))
    save_to_disk_dir(root / "hf", [TEXTS[:5]])
    out = str(tmp_path / "ds")
    index = build_shards([str(root)], "byte", out, shard_size=4096, val_fraction=0, progress=False)
    found = read_all(out, index)
    assert index["stats"]["documents"] == 31 and index["stats"]["files"] == 3
    assert bytes(found[f"{root / 'a.parquet'}:25"][:-1]).decode() == TEXTS[24]
    assert bytes(found[f"{root / 'b.jsonl.zst'}:1"][:-1]).decode() == "zst line"


def write_bytes(path, data):
    path.write_bytes(data)
    return path


def cut_after_first_batch(path):
    """A stream cut exactly between two record batches: pyarrow alone reads it as complete, with 7 rows."""
    table = pa.table({"text": TEXTS})
    with pa.OSFile(str(path), "wb") as sink:
        writer = ipc.new_stream(sink, table.schema)
        writer.write_batch(table.to_batches(max_chunksize=7)[0])  # not closed: no end-of-stream marker
    assert sum(b.num_rows for b in ipc.open_stream(pa.memory_map(str(path)))) == 7
    return path


def truncated(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * keep // 100])
    return path


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: truncated(write_parquet(d / "t.parquet", TEXTS), 60), r"cannot read .*t\.parquet"),
        (lambda d: truncated(write_parquet(d / "t.parquet", TEXTS), 0), r"cannot read .*t\.parquet"),
        (
            lambda d: write_parquet(d / "f.parquet", TEXTS, body=TEXTS),
            r"f\.parquet has no column 'bogus' .*--text-field",
        ),
        (lambda d: write_parquet(d / "n.parquet", TEXTS, bogus=list(range(25))), r"'bogus' is int64, not a string"),
        (
            lambda d: write_bytes(d / "c.jsonl.zst", b"\x28\xb5\x2f\xfd" + b"garbage" * 9),
            r"cannot read .*c\.jsonl\.zst",
        ),
        (lambda d: truncated(write_arrow(d / "a.arrow", pa.table({"text": TEXTS})), 70), r"cannot read .*a\.arrow"),
        (lambda d: write_bytes(d / "g.arrow", b"not arrow at all" * 4), r"cannot read .*g\.arrow"),
        (lambda d: cut_after_first_batch(d / "b.arrow"), r"b\.arrow: truncated \(no Arrow end-of-stream marker\)"),
        (lambda d: write_arrow(d / "s.arrow", pa.table({"bogus": list(range(9))})), r"'bogus' is int64, not a string"),
    ],
)
def test_unreadable_inputs_are_named_errors(tmp_path, make, match):
    path = make(tmp_path)
    with pytest.raises(DataError, match=match):
        build_shards(
            [str(path)],
            "byte",
            str(tmp_path / "ds"),
            text_field="bogus" if "bogus" in match else "text",
            progress=False,
        )


def test_truncated_zst_stream_is_a_named_error(tmp_path):
    data = zstandard.ZstdCompressor().compress(("".join(json.dumps({"text": t}) + "\n" for t in TEXTS)).encode())
    (tmp_path / "t.jsonl.zst").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cannot read .*t\.jsonl\.zst"):
        build_shards([str(tmp_path / "t.jsonl.zst")], "byte", str(tmp_path / "ds"), progress=False)


@pytest.mark.parametrize(
    "state, match",
    [
        ("{not json", "is not a Hugging Face datasets state.json"),
        ('{"_fingerprint": "x"}', r'no "_data_files" list'),
        ('{"_data_files": [{"filename": "../escape.arrow"}]}', "not an .arrow file name in that directory"),
        ('{"_data_files": [{"filename": "data-9.arrow"}]}', r"lists .*data-9\.arrow, which does not exist"),
    ],
)
def test_bad_dataset_directories(tmp_path, state, match):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "state.json").write_text(state)
    with pytest.raises(DataError, match=match):
        expand_inputs([str(tmp_path / "hf")])


def test_a_dataset_dict_asks_for_one_split(tmp_path, capsys):
    save_to_disk_dir(tmp_path / "dd" / "train", [TEXTS])
    save_to_disk_dir(tmp_path / "dd" / "test", [TEXTS[:2]])
    (tmp_path / "dd" / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    args = ["data", "build", "--input", str(tmp_path / "dd"), "--tokenizer", "byte", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "DatasetDict (splits test, train)" in err and "Traceback" not in err
    assert main([*args[:3], str(tmp_path / "dd" / "train"), *args[4:], "--workers", "1", "--no-progress"]) == 0
    assert "25 documents" in capsys.readouterr().out

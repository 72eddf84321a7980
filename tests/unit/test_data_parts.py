"""`bigtx data build --part I/N` + `bigtx data merge`: byte-identical to a single-process build, and the errors."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bigtx.cli.main import main
from bigtx.data import DataError
from bigtx.data.build import build_shards
from bigtx.data.parts import DOC_DTYPE, build_part, merge_parts, parse_part, plan_part


def make_inputs(root):
    """txt, a big jsonl (with blank, bad and empty lines), jsonl.gz and a parquet file of 14 row groups."""
    root.mkdir(parents=True)
    for i in range(5):
        (root / f"t{i}.txt").write_text(f"text file {i} " + "abc " * (i * 40))
    with open(root / "big.jsonl", "w") as f:
        for i in range(400):
            if i % 97 == 5:
                f.write("\n" if i % 2 else "not json\n")
            f.write(json.dumps({"text": f"line {i} é " + "z" * (i % 50)}) + "\n")
        f.write('{"text": ""}\n{"text": "no newline at the end"}')
    with gzip.open(root / "c.jsonl.gz", "wt") as f:
        for i in range(30):
            f.write(json.dumps({"text": f"gz {i}"}) + "\n")
    texts = [f"parquet row {i} " + "q" * (i % 30) if i % 41 else None for i in range(700)]
    pq.write_table(pa.table({"text": texts}), root / "d.parquet", row_group_size=50, compression="none")
    (root / "empty.jsonl").write_text("")
    return [str(root)]


def snapshot(out):
    return {name: (out / name).read_bytes() for name in sorted(os.listdir(out))}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("parts") / "in")


@pytest.mark.parametrize("shard_size", [4096, None])
def test_merged_parts_are_the_single_build_byte_for_byte(inputs, tmp_path, shard_size):
    opts = {"shard_size": shard_size, "val_fraction": 0.1, "progress": False}
    single = build_shards(inputs, "byte", str(tmp_path / "single"), **opts)
    assert single["stats"]["documents"] == 5 + 401 + 30 + 682 and single["stats"]["bad_lines_skipped"] == 2 + 18
    expected = snapshot(tmp_path / "single")
    assert len(expected) > 4
    for n in (1, 2, 3, 7):
        dirs = [str(tmp_path / f"n{n}-p{i}") for i in range(1, n + 1)]
        records = [build_part(inputs, "byte", d, i, n, **opts) for i, d in enumerate(dirs, start=1)]
        assert sum(r["documents"] for r in records) == single["stats"]["documents"]
        merge_parts(dirs[::-1], str(tmp_path / f"m{n}"))  # any order
        assert snapshot(tmp_path / f"m{n}") == expected, f"N={n}"


def test_big_files_split_by_byte_and_row_group_range(inputs):
    from bigtx.data.inputs import expand_inputs

    files = expand_inputs(inputs)
    sizes = [os.path.getsize(f) for f in files]
    plans = [plan_part(files, sizes, i, 3) for i in range(3)]
    big = [[u for u in plan if u.path.endswith("big.jsonl")] for plan in plans]
    parquet = [[u for u in plan if u.path.endswith(".parquet")] for plan in plans]
    assert sum(map(len, big)) >= 2 and sum(map(len, parquet)) >= 2  # both huge files are cut between parts
    units = [u for plan in plans for u in plan]
    assert [u.path for u in units] == sorted(u.path for u in units)  # parts in order are the input order
    cuts = [(u.start, u.end) for u in units if u.path.endswith(".parquet")]
    assert cuts[0][0] == 0 and cuts[-1][1] is None and all(a[1] == b[0] for a, b in zip(cuts, cuts[1:]))


def test_parse_part():
    assert parse_part("1/1") == (1, 1) and parse_part(" 3/8 ") == (3, 8)
    for bad in ("0/2", "3/2", "1/0", "garbage", "1/2/3", "-1/2", ""):
        with pytest.raises(DataError, match="--part"):
            parse_part(bad)


@pytest.fixture
def parts(inputs, tmp_path):
    dirs = [str(tmp_path / f"p{i}") for i in (1, 2, 3)]
    for i, d in enumerate(dirs, start=1):
        build_part(inputs, "byte", d, i, 3, shard_size=4096, val_fraction=0.1, progress=False)
    return dirs


def test_merge_refuses_a_missing_duplicated_foreign_or_damaged_part(inputs, parts, tmp_path):
    with pytest.raises(DataError, match="missing part"):
        merge_parts(parts[1:2], str(tmp_path / "o"))
    with pytest.raises(DataError, match="part 2/3 given twice"):
        merge_parts([*parts, parts[1]], str(tmp_path / "o"))
    other = str(tmp_path / "other")
    build_part(inputs, "byte", other, 2, 3, shard_size=4096, val_fraction=0.2, progress=False)
    with pytest.raises(DataError, match="come from different builds"):
        merge_parts([parts[0], other, parts[2]], str(tmp_path / "o"))
    with pytest.raises(DataError, match="holds no part.json"):
        merge_parts([*parts[:2], str(tmp_path)], str(tmp_path / "o"))
    record = json.loads((tmp_path / "p1" / "part.json").read_text())
    record["plan"]["options"]["val_fraction"] = 0.5  # edited by hand: the plan no longer matches its digest
    (tmp_path / "p1" / "part.json").write_text(json.dumps(record))
    with pytest.raises(DataError, match="its plan does not match its plan_sha256"):
        merge_parts(parts, str(tmp_path / "o"))
    meta = np.fromfile(tmp_path / "p2" / "docs.bin", DOC_DTYPE)
    meta["unit"][-1] = 99  # a unit the part never read
    meta.tofile(tmp_path / "p2" / "docs.bin")
    with pytest.raises(DataError, match=r"p2/docs\.bin does not match part\.json"):
        merge_parts(parts[1:], str(tmp_path / "o"))
    (tmp_path / "p3" / "part.json").write_text('{"format": "something else"}')
    with pytest.raises(DataError, match=r"p3/part\.json is not a usable part record \(no \"format\""):
        merge_parts(parts[2:], str(tmp_path / "o"))
    with open(os.path.join(parts[1], "tokens.bin"), "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match=r"tokens\.bin has 10 bytes, part\.json says"):
        merge_parts(parts[1:2], str(tmp_path / "o"))
    assert not os.path.exists(tmp_path / "o" / "index.json")


def test_cli_parts_and_merge(inputs, tmp_path, capsys):
    base = ["data", "build", "--input", *inputs, "--tokenizer", "byte", "--workers", "1", "--no-progress"]
    for i in (1, 2):
        assert main([*base, "--part", f"{i}/2", "--out", str(tmp_path / f"p{i}")]) == 0
    assert "part 2/2: " in capsys.readouterr().out
    assert main(["data", "merge", str(tmp_path / "p1"), str(tmp_path / "p2"), "--out", str(tmp_path / "m")]) == 0
    assert "merged 2 part(s)" in capsys.readouterr().out
    assert main([*base, "--out", str(tmp_path / "s")]) == 0
    assert snapshot(tmp_path / "m") == snapshot(tmp_path / "s")
    bad = [
        [*base, "--part", "0/2", "--out", str(tmp_path / "x")],
        [*base, "--part", "3/2", "--out", str(tmp_path / "x")],
        [*base, "--part", "garbage", "--out", str(tmp_path / "x")],
        [*base, "--part", "1/2", "--out", str(tmp_path / "p1")],  # already there, no --overwrite
        ["data", "merge", str(tmp_path / "p1"), "--out", str(tmp_path / "m2")],
        ["data", "merge", str(tmp_path / "p1"), str(tmp_path / "p2"), "--out", str(tmp_path / "m")],
    ]
    for args in bad:
        with pytest.raises(SystemExit) as exc:
            main(args)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.startswith("bigtx: error: ") and "Traceback" not in err, args


def test_parts_that_get_nothing(tmp_path):
    """One compressed file cannot be cut: the part owning its first byte reads it all, the others nothing."""
    with gzip.open(tmp_path / "only.jsonl.gz", "wt") as f:
        for i in range(50):
            f.write(json.dumps({"text": f"gz document {i}"}) + "\n")
    inputs = [str(tmp_path / "only.jsonl.gz")]
    build_shards(inputs, "byte", str(tmp_path / "single"), val_fraction=0.1, progress=False)
    dirs = [str(tmp_path / f"p{i}") for i in (1, 2, 3)]
    docs = [build_part(inputs, "byte", d, i, 3, val_fraction=0.1, progress=False)["documents"] for i, d in
            enumerate(dirs, start=1)]  # fmt: skip
    assert docs == [50, 0, 0]
    merge_parts(dirs, str(tmp_path / "merged"))
    assert snapshot(tmp_path / "merged") == snapshot(tmp_path / "single")

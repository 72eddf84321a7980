"""Checkpoint bookkeeping that needs no process group: commit marker, verification, retention, spec diffs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import xxhash

from bigtx.checkpoint import (
    apply_retention,
    complete_checkpoints,
    remove_incomplete,
    resolve,
    set_aside_after,
    spec_changes,
    tag_for,
    verify,
)
from bigtx.checkpoint.hashed_io import digest_file
from bigtx.checkpoint.resume import prepare_run_dir
from bigtx.checkpoint.store import COMPLETE, NEWEST, CheckpointError
from bigtx.cli.main import main
from bigtx.config import load_spec, spec_to_dict


def fake_checkpoint(root: Path, step: int, complete: bool = True, algorithm: str = "xxh3_128") -> Path:
    path = root / tag_for(step)
    path.mkdir(parents=True)
    (path / "shard.pt").write_bytes(bytes(range(256)) * 4)
    if complete:
        files = {"shard.pt": digest_file(path / "shard.pt", algorithm)}
        (path / COMPLETE).write_text(json.dumps({"step": step, "files": files}))
    return path


def test_only_committed_checkpoints_count(tmp_path: Path) -> None:
    fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 20)
    fake_checkpoint(tmp_path, 30, complete=False)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000020", "step_00000010"]
    assert [p.name for p in remove_incomplete(tmp_path)] == ["step_00000030"]
    assert not (tmp_path / "step_00000030").exists()


@pytest.mark.parametrize("algorithm", ["xxh3_128", "sha256"])  # sha256: checkpoints written before XXH3
def test_verify_detects_truncation_and_bit_flips(tmp_path: Path, algorithm: str) -> None:
    path = fake_checkpoint(tmp_path, 10, algorithm=algorithm)
    assert verify(path) == []
    data = bytearray((path / "shard.pt").read_bytes())
    data[100] ^= 1
    (path / "shard.pt").write_bytes(bytes(data))
    assert f"{algorithm} differs" in verify(path)[0]
    (path / "shard.pt").write_bytes(bytes(data[:500]))
    assert "truncated" in verify(path)[0]
    (path / "shard.pt").unlink()
    assert "missing" in verify(path)[0]


def test_digest_file_is_the_hash_of_the_bytes(tmp_path: Path) -> None:
    data = bytes(range(256)) * 4099
    (tmp_path / "f").write_bytes(data)
    (tmp_path / "empty").write_bytes(b"")
    assert digest_file(tmp_path / "f") == {"bytes": len(data), "xxh3_128": xxhash.xxh3_128(data).hexdigest()}
    assert digest_file(tmp_path / "f", "sha256") == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert digest_file(tmp_path / "empty") == {"bytes": 0, "xxh3_128": xxhash.xxh3_128(b"").hexdigest()}


@pytest.mark.parametrize(
    "entry",
    [
        {"bytes": 1024},
        {"sha256": "ab"},
        {"bytes": "1024", "xxh3_128": "ab"},
        {"bytes": 1024, "md5": "ab"},
        [1024],
        None,
    ],
)
def test_an_edited_commit_entry_is_a_named_problem(tmp_path: Path, entry: object) -> None:
    path = fake_checkpoint(tmp_path, 10)
    both = digest_file(path / "shard.pt") | digest_file(path / "shard.pt", "sha256")  # two digests: ambiguous
    for bad in (entry, both):
        (path / COMPLETE).write_text(json.dumps({"step": 10, "files": {"shard.pt": bad}}))
        [problem] = verify(path)
        assert "shard.pt: its COMPLETE.json entry" in problem and "(edited?)" in problem


def fake_run(run_dir: Path) -> Path:
    """A run directory with complete checkpoints at steps 10 and 20, ``newest`` pointing at 20."""
    root = run_dir / "checkpoints"
    for step in (10, 20):
        fake_checkpoint(root, step)
    (root / NEWEST).write_text(tag_for(20) + "\n")
    return root


def test_resolve_finds_newest_or_the_tag_and_names_the_choices(tmp_path: Path) -> None:
    root = fake_run(tmp_path)
    for given in (tmp_path, root, root / "step_00000020"):
        assert resolve(given) == root / "step_00000020"
    assert resolve(tmp_path, "10") == resolve(tmp_path, "step_00000010") == root / "step_00000010"
    with pytest.raises(CheckpointError, match="choose with --tag.*step_00000020, step_00000010"):
        resolve(tmp_path, "30")
    with pytest.raises(CheckpointError, match="is a single checkpoint"):
        resolve(root / "step_00000020", "10")
    with pytest.raises(CheckpointError, match="no such file"):
        resolve(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not a bigtx run directory"):
        resolve(tmp_path / "checkpoints" / "step_00000020" / "shard.pt")
    (root / NEWEST).unlink()  # a copied run without its pointer: the highest complete step
    assert resolve(tmp_path) == root / "step_00000020"
    (root / "step_00000020" / COMPLETE).unlink()
    assert resolve(tmp_path) == root / "step_00000010"
    (root / "step_00000010" / COMPLETE).unlink()
    with pytest.raises(CheckpointError, match="no complete checkpoint yet"):
        resolve(tmp_path)


def test_ckpt_verify_cli_reports_ok_or_the_damaged_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = fake_run(tmp_path)
    assert main(["ckpt", "verify", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == f"{root / 'step_00000020'}: ok (size and digest checked for 1 file(s))"
    shard = root / "step_00000010" / "shard.pt"
    shard.write_bytes(b"x" + shard.read_bytes()[1:])
    assert main(["ckpt", "verify", str(tmp_path)]) == 0  # newest is intact
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["ckpt", "verify", str(tmp_path), "--tag", "10"])
    assert info.value.code == 2 and "xxh3_128 differs" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["ckpt", "verify", str(tmp_path), "--tag", "30"])
    assert info.value.code == 2 and "choose with --tag" in capsys.readouterr().err


def test_retention_keeps_last_and_every(tmp_path: Path) -> None:
    for step in (10, 20, 30, 40, 50):
        fake_checkpoint(tmp_path, step)
    removed = apply_retention(tmp_path, keep_last=2, keep_every=20)
    assert sorted(p.name for p in removed) == ["step_00000010", "step_00000030"]
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000050", "step_00000040", "step_00000020"]


def test_spec_changes_safe_warn_refuse() -> None:
    old = spec_to_dict(load_spec("tiny"))
    new = spec_to_dict(
        load_spec(
            "tiny", ["train.max_steps=60", "train.log_every=5", "optim.lr=1e-3", "model.d_ff=128", "data.seq_len=32"]
        )
    )
    warnings, refusals = spec_changes(old, new)
    assert warnings == ["optim.lr: 0.003 -> 0.001"]
    assert refusals == ["data.seq_len: 64 -> 32", "model.d_ff: 176 -> 128"]


def test_a_resume_may_switch_the_teachers_source_and_placement_but_not_the_teacher(tmp_path: Path) -> None:
    (tmp_path / "teacher").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "cache").mkdir()
    teach = ["distill.alpha=0.5", "distill.top_k=8"]
    old = spec_to_dict(load_spec("tiny", [*teach, f"distill.teacher={tmp_path / 'teacher'}"]))
    cached = [*teach, f"distill.teacher={tmp_path / 'teacher'}", f"distill.source={tmp_path / 'cache'}"]
    assert spec_changes(old, spec_to_dict(load_spec("tiny", [*cached, "distill.placement=sharded"]))) == (
        [f"distill.source: 'online' -> '{tmp_path / 'cache'}'"],
        [],
    )
    other = spec_to_dict(load_spec("tiny", [*teach, f"distill.teacher={tmp_path / 'other'}"]))
    assert spec_changes(old, other)[1] == [f"distill.teacher: '{tmp_path / 'teacher'}' -> '{tmp_path / 'other'}'"]


def test_fresh_start_refuses_to_overwrite(tmp_path: Path) -> None:
    fake_checkpoint(tmp_path / "checkpoints", 10)
    prepare_run_dir(tmp_path, "auto", overwrite=False, is_main=True)  # resuming is fine
    with pytest.raises(CheckpointError, match="checkpoint.overwrite=true"):
        prepare_run_dir(tmp_path, "none", overwrite=False, is_main=True)
    prepare_run_dir(tmp_path, "none", overwrite=True, is_main=True)
    assert not (tmp_path / "checkpoints").exists()


def test_set_aside_after_moves_later_checkpoints_and_repoints_newest(tmp_path: Path) -> None:
    for step in (4, 8, 12):
        (tmp_path / f"step_{step:08d}").mkdir()
        (tmp_path / f"step_{step:08d}" / COMPLETE).write_text("{}")
    (tmp_path / "step_00000016").mkdir()  # an interrupted save
    (tmp_path / "universal/step_00000012").mkdir(parents=True)
    (tmp_path / NEWEST).write_text("step_00000012\n")
    aside = tmp_path / "rewound" / "rewind-1"
    moved = set_aside_after(tmp_path, 8, aside)
    assert [p.name for p in moved] == ["step_00000012", "step_00000016"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        NEWEST, "rewound", "step_00000004", "step_00000008", "universal"
    ]  # fmt: skip
    assert not any((tmp_path / "universal").iterdir())
    assert sorted(str(p.relative_to(aside)) for p in aside.rglob("*")) == [
        "step_00000012", f"step_00000012/{COMPLETE}", "step_00000016", "universal", "universal/step_00000012"
    ]  # fmt: skip
    assert (tmp_path / NEWEST).read_text() == "step_00000008\n"
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000008", "step_00000004"]
    assert set_aside_after(tmp_path, 8, aside) == [] and (tmp_path / NEWEST).read_text() == "step_00000008\n"

"""Small data on many readers: 2 gloo ranks train on a dataset of one train shard, which they share
document by document, and a run killed after a checkpoint resumes to the uninterrupted run's losses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bigtx.data.build import build_shards
from tests.harness import corpus_files, kill_after, start, tiny_overrides, train, train_records

pytestmark = pytest.mark.slow


def test_one_shard_two_ranks_resume_exactly(tmp_path: Path) -> None:
    shards = tmp_path / "one"
    build_shards([str(p) for p in corpus_files(40)], "byte", str(shards), shard_size=64 * 10**6, progress=False)
    index = json.loads((shards / "index.json").read_text())
    assert len(index["splits"]["train"]["shards"]) == 1  # fewer shards than the 2 readers

    common = ["train.max_steps=8", "checkpoint.every_steps=4", "precision=fp32", "schedule.warmup_steps=1"]
    reference = tmp_path / "reference"
    train("tiny", tiny_overrides(reference, shards, *common), 2, tmp_path / "logs", timeout=120)
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(run_dir, shards, *common)
    kill_after(start("tiny", overrides, 2, tmp_path / "logs"), run_dir / "checkpoints/step_00000004/COMPLETE.json")
    assert not (run_dir / "FINISHED").exists(), "the run finished before it could be killed"
    train("tiny", overrides, 2, tmp_path / "logs", timeout=120)
    assert "resumed from" in (run_dir / "train.log").read_text()

    want, got = train_records(reference), train_records(run_dir)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step]["loss"] == want[step]["loss"], f"step {step}: {got[step]['loss']} != {want[step]['loss']}"

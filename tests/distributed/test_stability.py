"""Spikes on 2 gloo ranks with real DeepSpeed (ZeRO-2 bf16; the skip also at ZeRO-3 fp32): a skipped step
leaves no trace but its data, a rewind continues exactly as a fresh resume from the same checkpoint with
the same data skipped, and a run out of rewinds stops with a clear message. Spikes come from the
``tests.distributed.spiky`` seam."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bigtx.stability import RewindRecord, read_record, write_record
from tests.harness import start, tiny_overrides, train, train_records

pytestmark = pytest.mark.slow

STABILITY = [
    "stability.window=10",
    "stability.warmup=3",
    "stability.rewind_spikes=2",
    "stability.rewind_within=5",
    "stability.skip_batches=2",
    "stability.max_rewinds=1",
    "train.eval_every=0",
]


def spiky(run_dir: Path, shards: Path, logs: Path, spikes: str, *extra: str) -> list[int]:
    """Train under the seam with ``spikes`` (BATCH:FACTOR,...); returns the exit codes."""
    overrides = tiny_overrides(run_dir, shards, *STABILITY, *extra)
    run = start("tiny", overrides, 2, logs, env={"BIGTX_TEST_SPIKE": spikes}, module="tests.distributed.spiky")
    return run.wait(300)


def resume_copy(src: Path, record: RewindRecord, run_dir: Path, shards: Path, logs: Path, *extra: str) -> None:
    """A fresh run of the same spec (no spikes) from a copy of ``src``'s checkpoint ``record.checkpoint``,
    told by ``record`` which data to skip after it, as a run requeued after a rewind is."""
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / record.checkpoint, run_dir / "checkpoints" / record.checkpoint)
    write_record(run_dir / "checkpoints", record)
    train("tiny", tiny_overrides(run_dir, shards, *STABILITY, *extra), 2, logs)


GUARD = ("skipped_spikes", "rewinds", "skipped_batches")


def same_steps(a: Path, b: Path, steps: range) -> None:
    """Loss, grad norm, lr and the guard's counters of these steps are bit-identical in two runs."""
    ra, rb = train_records(a), train_records(b)
    for step in steps:
        for key in ("loss", "grad_norm", "lr", *GUARD):
            assert ra[step][key] == rb[step][key], f"step {step} {key}: {ra[step][key]!r} != {rb[step][key]!r}"


@pytest.mark.parametrize("layout", [[], ["zero.stage=3", "precision=fp32"]], ids=["zero2-bf16", "zero3-fp32"])
def test_a_spike_is_skipped_as_if_its_batch_were_never_trained_on(
    tmp_path: Path, byte_shards: Path, layout: list[str]
) -> None:
    short = ("train.max_steps=12", "checkpoint.every_steps=7", *layout)
    run_dir = tmp_path / "spiky"
    assert spiky(run_dir, byte_shards, tmp_path / "logs", "8:30", *short) == [0, 0]
    log = (run_dir / "train.log").read_text()
    assert "step 8: spike skipped (loss " in log and "rewind" not in log
    records = train_records(run_dir)
    assert sorted(records) == list(range(1, 13))  # the skipped step took no step number: 12 were applied
    assert [records[s]["skipped_spikes"] for s in (7, 8, 12)] == [0, 1, 1]
    assert records[8]["loss"] < 10  # step 8 trained on batch 9; batch 8's loss was about 30 times this
    # the reference: from the checkpoint at step 7, batch 8 skipped as data (never trained on) and the
    # spike counted, by the record a rewind leaves
    reference = tmp_path / "reference"
    record = RewindRecord("step_00000007", skip_batches=1, rewinds=0, skipped_spikes=1, skipped_batches=0)
    resume_copy(run_dir, record, reference, byte_shards, tmp_path / "logs", *short)
    same_steps(run_dir, reference, range(8, 13))


def test_a_rewind_continues_as_a_fresh_resume_and_the_last_one_stops(tmp_path: Path, byte_shards: Path) -> None:
    long = ("train.max_steps=16", "checkpoint.every_steps=4")
    # spikes at batches 9 and 10: the first is skipped as step 9, so the second is step 9 again and rewinds
    # to step 8, skipping batches 9 and 10; step 9 then trains batch 11, so the nan at batch 16 falls on
    # step 14: a second rewind, one more than allowed
    run_dir = tmp_path / "spiky"
    codes = spiky(run_dir, byte_shards, tmp_path / "logs", "9:30,10:30,16:nan", *long)
    log = (run_dir / "train.log").read_text()
    assert codes == [1, 1], log
    assert "step 9: spike skipped" in log and "step 9: update skipped, rewinding" in log
    assert "spikes at steps 9, 9)" in log
    assert "rewind 1 of 1: back to" in log and "step_00000008" in log.split("rewind 1 of 1")[1].splitlines()[0]
    assert "stability.max_rewinds: the run needs rewind 2 (spikes from step 14) and 1 are allowed" in log
    records = train_records(run_dir)
    assert sorted(records) == list(range(1, 14))  # cut back to step 8 at the rewind, then steps 9..13 again
    assert {key: records[13][key] for key in GUARD} == {"skipped_spikes": 1, "rewinds": 1, "skipped_batches": 2}
    record = read_record(run_dir / "checkpoints")
    assert record == RewindRecord("step_00000008", skip_batches=2, rewinds=1, skipped_spikes=1, skipped_batches=2)
    # a fresh run from the same checkpoint, told by the same record to skip the same data
    reference = tmp_path / "reference"
    resume_copy(run_dir, record, reference, byte_shards, tmp_path / "logs", *long)
    same_steps(run_dir, reference, range(9, 14))

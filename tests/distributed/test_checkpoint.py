"""Checkpoints on 2 gloo ranks with real DeepSpeed: exact continuation, crashes, corruption, signals,
and a change of world size."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest

from tests.harness import kill_after, metrics, start, tiny_overrides, train, train_records, wait_until

pytestmark = pytest.mark.slow

CKPT20 = "checkpoints/step_00000020"


def same_steps(a: Path, b: Path, steps: range) -> None:
    """Loss, grad norm and lr of these steps are bit-identical in two runs."""
    ra, rb = train_records(a), train_records(b)
    for step in steps:
        for key in ("loss", "grad_norm", "lr"):
            assert ra[step][key] == rb[step][key], f"step {step} {key}: {ra[step][key]!r} != {rb[step][key]!r}"


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the uninterrupted 30-step runs (one per configuration) live, shared by the tests below."""
    return tmp_path_factory.mktemp("reference")


# ZeRO-3 resumes with gradient accumulation in the same run: each resume costs three launches
CONFIGS = {
    "zero2": ["zero.stage=2"],
    "zero3-accum2": ["zero.stage=3", "train.micro_batch_size=2", "train.grad_accum=2"],
}


def reference(root: Path, shards: Path, name: str) -> Path:
    """The uninterrupted run of configuration ``name`` (trained on first use)."""
    run_dir = root / name
    if not (run_dir / "FINISHED").exists():
        overrides = tiny_overrides(run_dir, shards, "train.max_steps=30", "checkpoint.every_steps=10", *CONFIGS[name])
        train("tiny", overrides, 2, root / "logs")
    return run_dir


# name -> (the reference configuration, overrides of the interrupted run): an asynchronous save must
# continue exactly as the synchronous reference does
CONTINUATIONS = {**{name: (name, []) for name in CONFIGS}, "zero2-async": ("zero2", ["checkpoint.async=true"])}


@pytest.mark.parametrize("name", list(CONTINUATIONS))
def test_exact_continuation_after_sigkill(tmp_path: Path, byte_shards: Path, references: Path, name: str) -> None:
    config, extra = CONTINUATIONS[name]
    ref = reference(references, byte_shards, config)
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(
        run_dir, byte_shards, "train.max_steps=30", "checkpoint.every_steps=20", *CONFIGS[config], *extra
    )
    run = start("tiny", overrides, 2, tmp_path / "logs")
    kill_after(run, run_dir / CKPT20 / "COMPLETE.json")
    assert not (run_dir / "FINISHED").exists(), "the run finished before it could be killed"
    train("tiny", overrides, 2, tmp_path / "logs")
    assert "resumed from" in (run_dir / "train.log").read_text()
    assert sorted(train_records(run_dir)) == list(range(1, 31))  # contiguous, nothing repeated
    same_steps(ref, run_dir, range(21, 31))
    # the end of training waited for the last save to be committed
    assert (run_dir / "checkpoints/newest").read_text().strip() == "step_00000030"


def test_kill_during_save_keeps_previous_checkpoint(tmp_path: Path, byte_shards: Path) -> None:
    # a wider model, so that saving takes long enough to be caught in the middle; fp32, because a CPU
    # without bf16 kernels (AVX2) trains this model in bf16 several times slower
    wide = ["model.d_model=256", "model.n_heads=8", "model.n_kv_heads=4", "model.d_ff=1024", "model.n_layers=4"]
    wide.append("precision=fp32")
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(run_dir, byte_shards, "train.max_steps=30", "checkpoint.every_steps=10", *wide)
    run = start("tiny", overrides, 2, tmp_path / "logs")
    kill_after(run, run_dir / CKPT20)  # the directory exists as soon as saving begins
    assert not (run_dir / CKPT20 / "COMPLETE.json").exists(), "the save completed before the kill"
    assert (run_dir / "checkpoints/newest").read_text().strip() == "step_00000010"
    before = train_records(run_dir)
    assert max(before) == 20  # every step up to the interrupted save was logged
    train("tiny", overrides, 2, tmp_path / "logs")
    log = (run_dir / "train.log").read_text()
    assert "removed incomplete checkpoint" in log and "step_00000010" in log.split("resumed from")[1].splitlines()[0]
    after = train_records(run_dir)
    assert sorted(after) == list(range(1, 31))
    for step in range(11, 21):  # the resumed run retraces the lost steps bit for bit
        for key in ("loss", "grad_norm", "lr"):
            assert after[step][key] == before[step][key], (step, key)


def test_kill_during_background_save_keeps_previous_checkpoint(tmp_path: Path, byte_shards: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(
        run_dir, byte_shards, "train.max_steps=30", "checkpoint.every_steps=10", "checkpoint.async=true"
    )
    # rank 0 holds each commit back 5 s: the step-20 save is then written and hashed on both ranks
    # (their digest lists are there) but not committed, while training goes on
    run = start("tiny", overrides, 2, tmp_path / "logs", env={"BIGTX_TEST_COMMIT_DELAY_S": "5"})
    lists = [run_dir / CKPT20 / f"digests/rank{r:05d}.json" for r in range(2)]
    wait_until(lambda: all(f.exists() for f in lists) and max(train_records(run_dir), default=0) >= 22, 60, "step 22")
    kill_after(run, run_dir / CKPT20)
    assert not (run_dir / CKPT20 / "COMPLETE.json").exists(), "the background save was committed before the kill"
    assert (run_dir / "checkpoints/newest").read_text().strip() == "step_00000010"
    before = train_records(run_dir)
    train("tiny", overrides, 2, tmp_path / "logs")
    log = (run_dir / "train.log").read_text()
    assert "removed incomplete checkpoint" in log and "step_00000010" in log.split("resumed from")[1].splitlines()[0]
    after = train_records(run_dir)
    assert sorted(after) == list(range(1, 31))
    for step in range(11, max(before) + 1):  # the resumed run retraces the lost steps bit for bit
        for key in ("loss", "grad_norm", "lr"):
            assert after[step][key] == before[step][key], (step, key)


def test_corrupt_checkpoint_falls_back(tmp_path: Path, byte_shards: Path, references: Path) -> None:
    ref = reference(references, byte_shards, "zero2")
    run_dir = tmp_path / "run"
    shutil.copytree(ref, run_dir)
    (run_dir / "FINISHED").unlink()
    victim = sorted((run_dir / "checkpoints/step_00000030").glob("*optim_states.pt"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    overrides = tiny_overrides(run_dir, byte_shards, "train.max_steps=30", "checkpoint.every_steps=10", "zero.stage=2")
    train("tiny", overrides, 2, tmp_path / "logs")
    log = (run_dir / "train.log").read_text()
    assert "is damaged, falling back" in log and "xxh3_128 differs" in log
    assert "resumed from" in log and "step_00000020" in log.split("resumed from")[1].splitlines()[0]
    same_steps(ref, run_dir, range(21, 31))


def test_sigterm_checkpoints_and_exits_for_requeue(tmp_path: Path, byte_shards: Path, references: Path) -> None:
    ref = reference(references, byte_shards, "zero2")
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(run_dir, byte_shards, "train.max_steps=30", "checkpoint.every_steps=100", "zero.stage=2")
    run = start("tiny", overrides, 2, tmp_path / "logs")
    wait_until(lambda: (run_dir / "metrics.jsonl").exists() and len(train_records(run_dir)) >= 5, 120, "step 5")
    run.procs[1].send_signal(signal.SIGTERM)  # one rank is enough: the ranks vote every step
    assert run.wait(120) == [75, 75], run.output()
    stopped_at = max(train_records(run_dir))
    assert stopped_at < 30
    assert (run_dir / f"checkpoints/step_{stopped_at:08d}/COMPLETE.json").exists()
    train("tiny", overrides, 2, tmp_path / "logs")
    assert sorted(train_records(run_dir)) == list(range(1, 31))
    same_steps(ref, run_dir, range(stopped_at + 1, 31))


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_resume_with_another_world_size(tmp_path: Path, byte_shards: Path, before: int, after: int) -> None:
    """2 ranks -> 1 and back. The global batch stays 8 (2 ranks x 4, or 1 rank x 4 x 2 accumulation
    steps) and the data readers stay 2 (one per rank, or 2 workers on one rank), so the data
    continues exactly; the weights and optimizer state go through DeepSpeed's universal format."""
    common = [
        "train.max_steps=30",
        "checkpoint.every_steps=10",
        "zero.stage=2",
        "train.micro_batch_size=4",
        "train.global_batch_size=8",
        "train.grad_accum=null",
    ]
    workers = {2: "data.num_workers=0", 1: "data.num_workers=2"}
    ref = tmp_path / "reference"
    train("tiny", tiny_overrides(ref, byte_shards, *common, workers[before]), before, tmp_path / "logs")
    run_dir = tmp_path / "run"
    shutil.copytree(ref, run_dir, ignore=shutil.ignore_patterns("step_00000030"))
    (run_dir / "FINISHED").unlink()
    train("tiny", tiny_overrides(run_dir, byte_shards, *common, workers[after]), after, tmp_path / "logs")
    log = (run_dir / "train.log").read_text()
    assert "re-sharding through DeepSpeed's universal checkpoint format" in log
    assert "resumed from" in log and "step_00000020" in log.split("resumed from")[1].splitlines()[0]
    ra, rb = train_records(ref), train_records(run_dir)
    assert sorted(rb) == list(range(1, 31))
    for step in range(21, 31):
        assert rb[step]["lr"] == ra[step]["lr"]
        assert rb[step]["tokens"] == ra[step]["tokens"]
        assert abs(rb[step]["loss"] - ra[step]["loss"]) <= 0.02 * ra[step]["loss"], (step, rb[step], ra[step])
    assert metrics(run_dir)[-1]["step"] == 30


def test_finished_run_does_nothing_unless_extended(tmp_path: Path, byte_shards: Path, references: Path) -> None:
    ref = reference(references, byte_shards, "zero2")
    run_dir = tmp_path / "run"
    shutil.copytree(ref, run_dir)
    overrides = tiny_overrides(run_dir, byte_shards, "checkpoint.every_steps=10", "zero.stage=2")
    train("tiny", [*overrides, "train.max_steps=30"], 2, tmp_path / "logs")  # a stray requeue
    assert "marked FINISHED at step 30; nothing to do" in (run_dir / "train.log").read_text()
    assert sorted(train_records(run_dir)) == list(range(1, 31))
    train("tiny", [*overrides, "train.max_steps=35"], 2, tmp_path / "logs")
    assert sorted(train_records(run_dir)) == list(range(1, 36))
    assert (run_dir / "FINISHED").read_text().split() == ["step", "35"]

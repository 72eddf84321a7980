"""The trainer on 2 gloo ranks with real DeepSpeed, a tiny model and real shards."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import (
    REPO,
    base_env,
    deepspeed_launch,
    free_port,
    kill_after,
    metrics,
    start,
    tiny_overrides,
    train,
    train_records,
)

pytestmark = pytest.mark.slow


def losses(run_dir: Path) -> list[float]:
    records = train_records(run_dir)
    return [records[s]["loss"] for s in sorted(records)]


@pytest.mark.parametrize(
    "extra",
    [
        ["zero.stage=3", "precision=bf16"],
        ["zero.stage=2", "precision=fp16"],
        ["zero.stage=2", "precision=bf16", "zero.offload_optimizer=true"],
    ],
    # ZeRO-1/2 in bf16 train in the checkpoint, metrics and export tests; the three here add a stage,
    # a precision and an optimizer of their own
    ids=["zero3-bf16", "zero2-fp16", "zero2-offload"],
)
def test_loss_goes_down(tmp_path: Path, byte_shards: Path, extra: list[str]) -> None:
    run_dir = tmp_path / "run"
    train("tiny", tiny_overrides(run_dir, byte_shards, "train.max_steps=30", *extra), 2, tmp_path / "logs")
    curve = losses(run_dir)
    assert len(curve) == 30
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    assert last < first - 0.5, f"loss did not fall: first5={first:.3f} last5={last:.3f}"
    if "precision=fp16" in extra:
        # dynamic loss scaling from 2**16 with hysteresis 2 and no growth within 30 steps: the first
        # overflow only spends the hysteresis, every later one halves the scale; each skips its step
        record = train_records(run_dir)[30]
        skipped = record["skipped_steps"]
        assert record["loss_scale"] == 2.0**16 / 2 ** max(0, skipped - 1), record


def assert_same_curves(tmp_path: Path, shards: Path, variants: dict[str, list[str]], rel: float) -> None:
    """Train each variant for 10 fp32 steps; every step's loss agrees across variants within ``rel``."""
    curves = {}
    for name, extra in variants.items():
        run_dir = tmp_path / name
        common = ["train.max_steps=10", "precision=fp32", "schedule.warmup_steps=2"]
        train("tiny", tiny_overrides(run_dir, shards, *common, *extra), 2, tmp_path / "logs")
        curves[name] = losses(run_dir)
    first, second = curves.values()
    for a, b in zip(first, second, strict=True):
        assert abs(a - b) <= rel * abs(a), curves


def test_zero3_with_activation_checkpointing_matches_zero0(tmp_path: Path, byte_shards: Path) -> None:
    """One comparison for two claims: ZeRO-3's partitioning and recomputing the blocks in the backward
    each change nothing but rounding, so together they must not either."""
    variants = {
        "zero0": ["zero.stage=0", "model.activation_checkpointing=none"],
        "zero3-every": ["zero.stage=3", "model.activation_checkpointing=every"],
    }
    assert_same_curves(tmp_path, byte_shards, variants, 1e-5)


def test_metrics_tensorboard_and_run_dir(tmp_path: Path, byte_shards: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    train(
        "tiny", tiny_overrides(run_dir, byte_shards, "train.max_steps=12", "train.eval_every=5"), 2, tmp_path / "logs"
    )
    for name in ("spec.yaml", "train.log", "metrics.jsonl", "tb", "checkpoints", "FINISHED", "heartbeat/rank1.json"):
        assert (run_dir / name).exists(), name
    records = metrics(run_dir)
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, 13))
    required = {
        "step",
        "loss",
        "loss_step",
        "lr",
        "grad_norm",
        "tokens",
        "tokens_per_s",
        "step_time_s",
        "data_wait_s",
        "tflops",
        "mfu",
        "mem_gb",
        "loss_scale",
        "skipped_steps",
        "bad_shards",
        "slowest_rank",
        "slowest_busy_s",
        "median_busy_s",
        "slowest_data_wait_s",
        "median_data_wait_s",
    }
    assert required <= set(records[0])
    assert not {"ce_loss", "kd_loss", "teacher_ce", "teacher_time_s", "teacher_share", "z_loss"} & set().union(*records)
    assert {r["slowest_rank"] for r in records if "loss" in r} <= {0, 1}
    assert records[0]["tokens"] == 2 * 4 * 64  # world x micro batch x seq_len
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [5, 10, 12] and all(r["val_ppl"] > 1 for r in evals)

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mem_gb", "tflops", "slowest_rank", "slowest_busy_s"):
        assert f"train/{key}" in tags
    assert "val/val_loss" in tags
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 13))
    assert events.Scalars("train/loss")[-1].value == pytest.approx(train_records(run_dir)[12]["loss"], rel=1e-6)
    spec_text = (run_dir / "spec.yaml").read_text()
    assert "DeepSpeed config derived from this spec" in spec_text and '"train_batch_size": 8' in spec_text


def test_logged_loss_is_the_window_mean_also_across_a_resume(tmp_path: Path, byte_shards: Path) -> None:
    """``loss`` averages the steps since the last metrics line (``loss_step`` is the step's own). A run
    logging every 3 steps, killed after its checkpoint at step 5 and resumed, logs exactly the means of
    an every-step run: the step-6 line averages steps 4 and 5 (before the kill) with step 6."""
    common = ["train.max_steps=9", "precision=fp32", "schedule.warmup_steps=1", "checkpoint.every_steps=5"]
    every = tmp_path / "every"
    train("tiny", tiny_overrides(every, byte_shards, "train.log_every=1", *common), 2, tmp_path)
    steps = {s: r["loss_step"] for s, r in train_records(every).items()}
    sparse = tmp_path / "sparse"
    overrides = tiny_overrides(sparse, byte_shards, "train.log_every=3", *common)
    kill_after(start("tiny", overrides, 2, tmp_path), sparse / "checkpoints/step_00000005/COMPLETE.json")
    train("tiny", overrides, 2, tmp_path)
    logged = train_records(sparse)
    assert sorted(logged) == [3, 6, 9]
    assert logged[3]["loss"] == (steps[1] + steps[2] + steps[3]) / 3
    assert logged[6]["loss"] == (steps[4] + steps[5] + steps[6]) / 3
    assert logged[9]["loss"] == (steps[7] + steps[8] + steps[9]) / 3
    assert [logged[s]["loss_step"] for s in (3, 6, 9)] == [steps[s] for s in (3, 6, 9)]


def test_deepspeed_launcher_and_single_process(tmp_path: Path, byte_shards: Path) -> None:
    ds_dir = tmp_path / "ds"
    code = deepspeed_launch(
        "tiny",
        tiny_overrides(ds_dir, byte_shards, "train.max_steps=5", "schedule.warmup_steps=1"),
        2,
        tmp_path / "ds.log",
    )
    assert code == 0, (tmp_path / "ds.log").read_text()[-3000:]
    assert len(train_records(ds_dir)) == 5 and "0:" in (ds_dir / "train.log").read_text()

    single = tmp_path / "single"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "bigtx",
            "train",
            "tiny",
            *(
                f"--set={o}"
                for o in tiny_overrides(single, byte_shards, "train.max_steps=3", "schedule.warmup_steps=1")
            ),
        ],
        env={k: v for k, v in base_env().items() if k not in ("RANK", "WORLD_SIZE")},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert [r["step"] for r in metrics(single) if "loss" in r] == [1, 2, 3]


def test_torchrun(tmp_path: Path, byte_shards: Path) -> None:
    run_dir = tmp_path / "torchrun"
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [
        str(torchrun),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "bigtx.train",
        "tiny",
        *(f"--set={o}" for o in tiny_overrides(run_dir, byte_shards, "train.max_steps=4", "schedule.warmup_steps=1")),
    ]
    res = subprocess.run(cmd, env=base_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(train_records(run_dir)) == [1, 2, 3, 4]
    assert "2 rank(s)" in (run_dir / "train.log").read_text()


def test_spec_errors_stop_before_any_process_group(tmp_path: Path, byte_shards: Path) -> None:
    run_dir = tmp_path / "bad"

    def train(*overrides: str) -> subprocess.CompletedProcess:
        sets = [arg for override in (f"run.dir={run_dir}", *overrides) for arg in ("--set", override)]
        cmd = [sys.executable, "-m", "bigtx", "train", "tiny", *sets]
        return subprocess.run(cmd, env=base_env(), cwd=REPO, capture_output=True, text=True, timeout=120)

    res = train(f"data.train={byte_shards}", "model.n_kv_heads=3")
    assert res.returncode == 2 and "model.n_kv_heads" in res.stderr and "Traceback" not in res.stderr
    assert not run_dir.exists()
    missing = train(f"data.train={tmp_path / 'nowhere'}")
    assert missing.returncode == 2 and "data.train" in missing.stderr and "Traceback" not in missing.stderr


def test_an_error_on_one_rank_stops_every_rank(tmp_path: Path, byte_shards: Path) -> None:
    """Rank 1's first shard is corrupt and data.on_error=raise: the job ends promptly with rank 1's
    message instead of rank 0 waiting in a collective."""
    import shutil
    import time

    from bigtx.config import load_spec
    from bigtx.data import build_loader

    shards = tmp_path / "shards"
    shutil.copytree(byte_shards, shards)
    spec = load_spec("tiny", [f"data.train={shards}"])
    rank1 = build_loader(
        spec.data,
        "train",
        seq_len=64,
        micro_batch_size=4,
        rank=1,
        world_size=2,
        seed=spec.run.seed,
        vocab_size=spec.model.vocab_size,
    )
    victim = Path(rank1.shards_for(epoch=0, reader=0)[0][0])
    victim.write_bytes(victim.read_bytes()[:1000])  # truncated

    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    code = deepspeed_launch("tiny", tiny_overrides(run_dir, shards, "data.on_error=raise"), 2, tmp_path / "ds.log")
    log = (tmp_path / "ds.log").read_text()
    assert code != 0 and time.monotonic() - t0 < 120
    assert "bigtx rank 1: error:" in log and victim.name in log and "truncated" in log

"""Hangs and stragglers on 2 real gloo ranks: a rank slowed on purpose is named in the metrics, and a
SIGSTOPped rank is named by `bigtx doctor` after its peer dumped its stacks and timed out."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bigtx.heartbeat import read_dump_header
from tests.harness import REPO, base_env, metrics, start, tiny_overrides, train_records, wait_until

pytestmark = pytest.mark.slow


def doctor(run_dir: Path) -> tuple[int, dict]:
    done = subprocess.run(
        [sys.executable, "-m", "bigtx", "doctor", str(run_dir), "--json"],
        capture_output=True,
        text=True,
        env=base_env(),
        cwd=REPO,
        timeout=60,
    )
    return done.returncode, json.loads(done.stdout)


def test_a_rank_slow_on_purpose_is_named_the_slowest(tmp_path: Path, byte_shards: Path) -> None:
    """Rank 1 gets every batch 0.5 s late (tests/distributed/slow_rank.py): every metrics line names it,
    with its data wait, and `bigtx doctor` repeats it for the finished run."""
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(run_dir, byte_shards, "train.max_steps=8", "train.log_every=4", "train.eval_every=0")
    run = start(
        "tiny",
        overrides,
        2,
        tmp_path / "logs",
        module="tests.distributed.slow_rank",
        env={"BIGTX_TEST_SLOW_RANK": "1", "BIGTX_TEST_SLOW_S": "0.5"},
    )
    assert run.wait(120) == [0, 0], run.output()
    lines = train_records(run_dir)
    assert sorted(lines) == [4, 8]
    for record in lines.values():
        assert record["slowest_rank"] == 1
        assert 0.5 <= record["slowest_data_wait_s"] < 0.8
        other = 2 * record["median_busy_s"] - record["slowest_busy_s"]  # the median of two is their mean
        # half the delay: rank 0's own busy time swings by a tenth of a second on a loaded 2-core machine
        assert record["slowest_busy_s"] - other > 0.25, record
    code, report = doctor(run_dir)
    assert (code, report["status"]) == (0, "finished")
    assert f"slowest rank at step 8: rank 1 on host {socket.gethostname()}, busy 0." in report["lines"][1]


def test_a_stopped_rank_is_named_after_its_peer_dumps_and_times_out(tmp_path: Path, byte_shards: Path) -> None:
    """Rank 1 is SIGSTOPped: rank 0 dumps its stacks waiting for it and times out, and `bigtx doctor`
    names rank 1; still after rank 1 is continued and ended the way SLURM ends a step (SIGCONT, SIGTERM)."""
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(
        run_dir,
        byte_shards,
        "train.max_steps=100000",
        "train.eval_every=0",
        "checkpoint.every_steps=0",
        "watchdog.floor_s=2",
    )
    run = start("tiny", overrides, 2, tmp_path / "logs", env={"BIGTX_DIST_TIMEOUT_S": "12", "BIGTX_STOP_GRACE_S": "5"})
    host = socket.gethostname()
    try:
        trained = lambda: (run_dir / "metrics.jsonl").exists() and len(metrics(run_dir)) >= 3
        wait_until(lambda: trained() or any(p.poll() is not None for p in run.procs), 120, "3 steps")
        assert all(p.poll() is None for p in run.procs), run.output()
        os.kill(run.procs[1].pid, signal.SIGSTOP)
        # rank 0 waits for rank 1 in a collective: it dumps its stacks after 2-4 s, and its collective
        # times out after 12 s (the watchdog's limit is capped at half of that)
        assert run.procs[0].wait(timeout=60) == 1, run.output()
        dumps = [read_dump_header(p) for p in sorted((run_dir / "hang").glob("rank0-*.txt"))]
        last = dumps[-1]
        assert last["phase"] in ("backward", "optimizer", "sync"), last
        assert "distributed" in last["top"] or "comm" in last["top"], last
        code, report = doctor(run_dir)
        assert (code, report["status"]) == (1, "stuck"), report
        assert [(b["rank"], b["host"]) for b in report["blamed"]] == [(1, host)]
        assert report["lines"][0].startswith(f"rank 1 on host {host} (pid {run.procs[1].pid}) is stuck: its last")
        assert report["lines"][1].startswith(f"rank 0 on host {host} (pid {run.procs[0].pid}) waited in")
        assert f"top of stack: {last['top']}" in report["lines"][1]
        for sig in (signal.SIGCONT, signal.SIGTERM):
            os.kill(run.procs[1].pid, sig)
        assert run.procs[1].wait(timeout=30) != 0, run.output()
        code, report = doctor(run_dir)
    finally:
        run.kill()
    assert (code, [(b["rank"], b["host"]) for b in report["blamed"]]) == (1, [(1, host)]), report
    assert report["lines"][0].startswith(
        f"rank 1 on host {host} (pid {run.procs[1].pid}) is stuck: its process did not run for "
    ), report

"""Run real multi-process bigtx training in tests: N ranks on gloo, each its own process.

Ranks are started the way torchrun does it (RANK/WORLD_SIZE/MASTER_* in the environment), so a
test can signal or SIGKILL individual ranks. ``deepspeed_launch`` goes through the real
``deepspeed`` launcher instead.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bigtx.distributed import free_port, spawn_local

REPO = Path(__file__).resolve().parents[1]


def corpus_files(limit: int = 120) -> list[Path]:
    """Real text that every machine has: a fixed slice of the standard library's sources."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if 2_000 < p.stat().st_size < 60_000)
    return files[:limit]


def base_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("BIGTX_DIST_TIMEOUT_S", "60")
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Run:
    procs: list[subprocess.Popen]
    logs: list[Path]

    def wait(self, timeout: float = 300) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"training did not finish in {timeout}s:\n{self.output()}") from None
        return codes

    def kill(self, sig: int = signal.SIGKILL) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(sig)
        for p in self.procs:
            p.wait(timeout=60)

    def output(self) -> str:
        return "\n".join(f"--- rank {i} ---\n{log.read_text()[-4000:]}" for i, log in enumerate(self.logs))


def start(spec: str, overrides: list[str], nproc: int, log_dir: Path, env: dict[str, str] | None = None) -> Run:
    """Start ``nproc`` ranks of ``python -m bigtx.train SPEC --set ...``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "bigtx.train", spec, *(f"--set={o}" for o in overrides)]
    stamp = time.monotonic_ns()
    logs = [log_dir / f"rank{rank}-{stamp}.log" for rank in range(nproc)]
    return Run(spawn_local(args, nproc, {**base_env(), **(env or {})}, logs, cwd=REPO), logs)


def train(spec: str, overrides: list[str], nproc: int, log_dir: Path, expect: int = 0, timeout: float = 300) -> Run:
    run = start(spec, overrides, nproc, log_dir)
    codes = run.wait(timeout)
    assert codes == [expect] * nproc, f"exit codes {codes}, expected {expect}:\n{run.output()}"
    return run


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_records(run_dir: Path) -> dict[int, dict]:
    """Per-step training records (evaluation lines left out)."""
    return {r["step"]: r for r in metrics(run_dir) if "loss" in r}


def deepspeed_launch(spec: str, overrides: list[str], nproc: int, log: Path, timeout: float = 300) -> int:
    """Run through the real `deepspeed` launcher, as users do; returns its exit code."""
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [str(deepspeed), "--num_gpus", str(nproc), "--master_port", str(free_port()), "--module", "bigtx.train",
           spec, *(f"--set={o}" for o in overrides)]
    with log.open("w") as out:
        return subprocess.run(cmd, env=base_env(), stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                              timeout=timeout).returncode


def tiny_overrides(run_dir: Path, shards: Path, *extra: str) -> list[str]:
    """The tiny preset pointed at test shards, quiet, with the given extra overrides."""
    return [f"run.dir={run_dir}", f"data.train={shards}", "train.progress_bar=false", *extra]

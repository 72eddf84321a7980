"""Run real multi-process bigtx training in tests: N ranks on gloo, each its own process.

Ranks are started the way torchrun does it (RANK/WORLD_SIZE/MASTER_* in the environment), so a
test can signal or SIGKILL individual ranks. ``deepspeed_launch`` goes through the real
``deepspeed`` launcher instead.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bigtx.distributed import free_port
from bigtx.metrics import read_records
from tools.local_ranks import spawn_local

REPO = Path(__file__).resolve().parents[1]


def corpus_files(limit: int = 120) -> list[Path]:
    """Real text that every machine has: a fixed slice of the standard library's sources."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if 2_000 < p.stat().st_size < 60_000)
    return files[:limit]


def build_byte_shards(out: Path) -> Path:
    """Shards of ``corpus_files()`` with the built-in byte tokenizer, via `bigtx data build` (deterministic)."""
    cmd = [
        sys.executable,
        "-m",
        "bigtx",
        "data",
        "build",
        "--input",
        *map(str, corpus_files()),
        "--tokenizer",
        "byte",
        "--out",
        str(out),
        "--shard-size",
        "200KB",
        "--val-fraction",
        "0.1",
    ]
    subprocess.run(cmd, check=True, env=base_env(), cwd=REPO, capture_output=True)
    return out


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


def start(
    spec: str,
    overrides: list[str],
    nproc: int,
    log_dir: Path,
    env: dict[str, str] | None = None,
    module: str = "bigtx.train",
) -> Run:
    """Start ``nproc`` ranks of ``python -m bigtx.train SPEC --set ...`` (or of a test seam ``module``
    that wraps it)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", module, spec, *(f"--set={o}" for o in overrides)]
    stamp = time.monotonic_ns()
    logs = [log_dir / f"rank{rank}-{stamp}.log" for rank in range(nproc)]
    return Run(spawn_local(args, nproc, {**base_env(), **(env or {})}, logs, cwd=REPO), logs)


def train(
    spec: str,
    overrides: list[str],
    nproc: int,
    log_dir: Path,
    expect: int = 0,
    timeout: float = 300,
    env: dict[str, str] | None = None,
) -> Run:
    run = start(spec, overrides, nproc, log_dir, env)
    codes = run.wait(timeout)
    assert codes == [expect] * nproc, f"exit codes {codes}, expected {expect}:\n{run.output()}"
    return run


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def kill_after(run: Run, path: Path) -> None:
    """SIGKILL every rank as soon as ``path`` exists (freezing them first so they cannot run on)."""
    wait_until(lambda: path.exists() or all(p.poll() is not None for p in run.procs), 120, f"{path}")
    for p in run.procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGSTOP)
    run.kill(signal.SIGKILL)


def metrics(run_dir: Path) -> list[dict]:
    """The finished lines of a run's metrics.jsonl (the run may still be writing its last one)."""
    return read_records(run_dir / "metrics.jsonl")


def train_records(run_dir: Path) -> dict[int, dict]:
    """Per-step training records (evaluation lines left out)."""
    return {r["step"]: r for r in metrics(run_dir) if "loss" in r}


def deepspeed_launch(spec: str, overrides: list[str], nproc: int, log: Path, timeout: float = 300) -> int:
    """Run through the real `deepspeed` launcher, as users do; returns its exit code."""
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [
        str(deepspeed),
        "--num_gpus",
        str(nproc),
        "--master_port",
        str(free_port()),
        "--module",
        "bigtx.train",
        spec,
        *(f"--set={o}" for o in overrides),
    ]
    with log.open("w") as out:
        return subprocess.run(
            cmd, env=base_env(), stdout=out, stderr=subprocess.STDOUT, cwd=REPO, timeout=timeout
        ).returncode


# multiprocessing's own helpers started by the test process itself; they end with it
_MP_HELPERS = ("multiprocessing.forkserver", "multiprocessing.resource_tracker")


def stray_processes(since: float) -> list[str]:
    """Processes started after ``since`` that are still running and were left by bigtx runs: every
    live descendant of this process except multiprocessing's helpers, and orphans (re-parented to
    init) whose command line names bigtx, deepspeed or torchrun, or DataLoader workers. Other
    people's runs on the same machine have live parents and are not counted. One line per process."""
    import psutil

    me = psutil.Process()
    ancestors = {p.pid for p in me.parents()} | {me.pid}
    descendants = {p.pid for p in me.children(recursive=True)}
    helpers = set()
    for child in me.children():
        try:
            if any(h in " ".join(child.cmdline()) for h in _MP_HELPERS):
                helpers |= {child.pid} | {c.pid for c in child.children(recursive=True)}
        except psutil.Error:
            continue
    found = []
    for p in psutil.process_iter():
        try:
            if p.pid in ancestors or p.pid in helpers or p.create_time() < since:
                continue
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(p.cmdline())
            named = p.name() == "pt_data_worker" or any(w in cmdline for w in ("bigtx", "deepspeed", "torchrun"))
            if p.pid in descendants or (p.ppid() == 1 and named):
                found.append(f"pid {p.pid} (parent {p.ppid()}, {p.name()}): {cmdline[:200]}")
        except psutil.Error:
            continue
    return found


def tiny_overrides(run_dir: Path, shards: Path, *extra: str) -> list[str]:
    """The tiny preset pointed at test shards, quiet, with the given extra overrides."""
    return [f"run.dir={run_dir}", f"data.train={shards}", "train.progress_bar=false", *extra]


def _rank_main(rank: int, fn: Callable, world_size: int, port: int, init: bool, args: tuple) -> None:
    import datetime

    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    if init:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        fn(rank, world_size, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int, *args: object, timeout: float = 120, init: bool = True) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks, each a fresh process, from
    inside a test (OLMo-core's ``run_distributed_test`` is the model). ``fn`` and ``args`` must be
    picklable (a module-level function). The process group is started first unless ``init`` is
    False (the environment of a torchrun rank is set either way). A failure on any rank fails the
    test with that rank's traceback; ranks still running after ``timeout`` seconds are killed and
    the test fails."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        _rank_main, args=(fn, world_size, free_port(), init, args), nprocs=world_size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise AssertionError(f"{fn.__name__} did not finish on {world_size} ranks in {timeout}s")

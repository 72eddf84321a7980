"""`bigtx launch local`: N ranks on this machine through DeepSpeed's launcher.

DeepSpeed's local path is ``runner -> deepspeed.launcher.launch -> one process per rank``; the
launcher sets RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT for each rank. On a CPU-only
machine ``--num_gpus N`` still starts N processes (DeepSpeed's CPU accelerator). SIGUSR1 and
SIGTERM sent to ``bigtx launch local`` are passed to the ranks themselves, so that they can
checkpoint: DeepSpeed's runner has no handler for USR1 (it would die of it), and its
``launch`` kills the ranks outright on TERM. A rank has ``BIGTX_STOP_GRACE_S`` seconds to reach a
step boundary and leaves by itself after that (``bigtx.distributed.StopRequest``); ranks (and their
children) still alive ``KILL_MARGIN_S`` seconds later are killed, so that no rank outlives the launch.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading

import psutil

from bigtx import lifetime

FORWARDED_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
# After a rank's own grace period: time to write the checkpoint it started at its step boundary.
KILL_MARGIN_S = 60.0


def local_command(
    spec: str,
    overrides: list[str],
    nproc: int,
    *,
    python: str = sys.executable,
    master_port: int = 29500,
    bind_cores: bool = False,
) -> list[str]:
    """The DeepSpeed launcher command that runs ``bigtx train SPEC --set ...`` on ``nproc`` ranks."""
    if nproc < 1:
        raise ValueError(f"--nproc: must be at least 1, got {nproc}")
    cmd = [python, "-u", "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port", str(master_port)]
    if bind_cores:
        cmd.append("--bind_cores_to_rank")
    # --module runs `python -m bigtx train ...`; --no_local_rank: bigtx reads LOCAL_RANK from the environment
    cmd += ["--module", "--no_local_rank", "bigtx", "train", spec]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def _ranks(runner: psutil.Process) -> list[psutil.Process]:
    """The rank processes: children of DeepSpeed's ``launch``, itself the runner's child."""
    try:
        return [rank for launch in runner.children() for rank in launch.children()]
    except psutil.Error:
        return []


def _kill_tree(processes: list[psutil.Process]) -> list[psutil.Process]:
    """SIGKILL these processes and all their descendants, and wait (briefly) until they are gone;
    returns those that were still alive."""
    alive = []
    for proc in processes:
        try:
            tree = [proc, *proc.children(recursive=True)]
        except psutil.Error:
            continue
        for p in tree:
            try:
                p.kill()
                alive.append(p)
            except psutil.Error:
                pass
    psutil.wait_procs(alive, timeout=5)
    return alive


def run(cmd: list[str], grace_s: float | None = None, margin_s: float = KILL_MARGIN_S) -> int:
    """Run the launcher; pass USR1/TERM on to the ranks; return the launcher's exit code.

    After a forwarded signal, ranks still alive ``grace_s`` (default ``$BIGTX_STOP_GRACE_S``, else
    120) plus ``margin_s`` seconds later are killed with their children, and so is anything the
    launcher leaves behind when it exits.
    """
    grace = grace_s if grace_s is not None else lifetime.stop_grace()
    proc = subprocess.Popen(cmd)
    runner = psutil.Process(proc.pid)
    seen: dict[int, psutil.Process] = {}
    deadline: list[threading.Timer] = []

    def escalate() -> None:
        killed = _kill_tree(list(seen.values()))
        if killed:
            print(
                f"bigtx launch local: {len(killed)} process(es) still alive {grace + margin_s:g}s after "
                "the stop signal; killed them (SIGKILL)",
                file=sys.stderr,
                flush=True,
            )

    def forward(signum: int, frame: object) -> None:
        ranks = _ranks(runner)
        seen.update((r.pid, r) for r in ranks)
        print(
            f"bigtx launch local: passing {signal.Signals(signum).name} to {len(ranks)} rank(s)",
            file=sys.stderr,
            flush=True,
        )
        for rank in ranks:
            try:
                rank.send_signal(signum)
            except psutil.Error:
                pass
        if not deadline:
            deadline.append(threading.Timer(grace + margin_s, escalate))
            deadline[0].daemon = True
            deadline[0].start()

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    # Ctrl-C reaches every process of the terminal's group; DeepSpeed's launch handles it
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        code = _exit_code(_wait_noting_ranks(proc, runner, seen))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for timer in deadline:
            timer.cancel()
    # the launcher has exited: nothing it started may outlive it
    leftovers = _kill_tree(list(seen.values()))
    if leftovers:
        print(f"bigtx launch local: killed {len(leftovers)} process(es) left behind by the launcher", file=sys.stderr)
    return code


def _wait_noting_ranks(proc: subprocess.Popen, runner: psutil.Process, seen: dict[int, psutil.Process]) -> int:
    """Wait for the launcher, remembering every rank process it starts (to clean up after it)."""
    while True:
        seen.update((r.pid, r) for r in _ranks(runner))
        try:
            return proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            continue


def _exit_code(returncode: int) -> int:
    # a launcher killed by a signal: report it the way a shell would
    return 128 - returncode if returncode < 0 else returncode

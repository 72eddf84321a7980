"""`bigtx launch local`: N ranks on this machine through DeepSpeed's launcher.

DeepSpeed's local path is ``runner -> deepspeed.launcher.launch -> one process per rank``; the
launcher sets RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT for each rank. On a CPU-only
machine ``--num_gpus N`` still starts N processes (DeepSpeed's CPU accelerator). SIGUSR1 and
SIGTERM sent to ``bigtx launch local`` are passed to the ranks themselves, so that they can
checkpoint: DeepSpeed's runner has no handler for USR1 (it would die of it), and its
``launch`` kills the ranks outright on TERM.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import psutil

FORWARDED_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


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


def run(cmd: list[str]) -> int:
    """Run the launcher; pass USR1/TERM on to the ranks; return the launcher's exit code."""
    proc = subprocess.Popen(cmd)
    runner = psutil.Process(proc.pid)

    def forward(signum: int, frame: object) -> None:
        ranks = _ranks(runner)
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

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    # Ctrl-C reaches every process of the terminal's group; DeepSpeed's launch handles it
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return _exit_code(proc.wait())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _exit_code(returncode: int) -> int:
    # a launcher killed by a signal: report it the way a shell would
    return 128 - returncode if returncode < 0 else returncode

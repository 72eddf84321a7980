"""Where this process sits in the job, and the process group.

One code path for every launcher: the environment decides. ``torchrun`` and the ``deepspeed``
launcher export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; under ``srun`` they come from SLURM's
variables; with no launcher the process is rank 0 of 1.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import FrameType

import torch

# `bigtx train` exit codes; the launchers requeue on EXIT_REQUEUE (EX_TEMPFAIL from sysexits.h).
EXIT_FINISHED = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_REQUEUE = 75


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "single", "torchrun/deepspeed" or "slurm"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_master_addr() -> str:
    """First host of the allocation (its NodeAddr where scontrol knows one)."""
    hosts = subprocess.run(
        ["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]], capture_output=True, text=True, check=True
    ).stdout.split()
    node = subprocess.run(["scontrol", "show", "node", hosts[0]], capture_output=True, text=True).stdout
    for field in node.split():
        if field.startswith("NodeAddr="):
            return field.split("=", 1)[1]
    return hosts[0]


def detect(environ: dict[str, str] | None = None) -> DistEnv:
    """Read rank, world size, local rank and master address from the launcher's environment."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", "29500")),
            launcher="torchrun/deepspeed",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        job_id = int(env.get("SLURM_JOB_ID", "0"))
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            local_world_size=int(env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]),
            master_addr=env.get("MASTER_ADDR") or _slurm_master_addr(),
            # a port derived from the job id, so two jobs sharing a node do not collide
            master_port=int(env.get("MASTER_PORT", str(20000 + job_id % 20000))),
            launcher="slurm",
        )
    return DistEnv(0, 1, 0, 1, "127.0.0.1", free_port(), "single")


def timeout() -> timedelta:
    """Collective timeout: a dead peer turns into an error after this, never a hang."""
    return timedelta(seconds=float(os.environ.get("BIGTX_DIST_TIMEOUT_S", "600")))


def init(env: DistEnv) -> None:
    """Start the process group (gloo on CPU, NCCL on GPUs) through DeepSpeed."""
    import deepspeed

    os.environ.update(
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank),
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
    )
    # DeepSpeed builds its own groups with new_group(), which take torch's default timeout (30 min),
    # not the one passed here: a frozen peer would hang the job for half an hour.
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = timeout()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    elif "OMP_NUM_THREADS" not in os.environ:
        # ranks on one box share its cores; oversubscription makes every rank slower
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.local_world_size))
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout(), verbose=False)


def allow_emulated_fp16() -> bool:
    """Let DeepSpeed train in fp16 on a CPU without native fp16 kernels; True if that was needed.

    DeepSpeed's CPU accelerator refuses fp16 unless oneDNN has fp16 kernels (AVX512-FP16/AMX). torch
    computes fp16 on any CPU, only slower, and bigtx's fp16 path (loss scaling, skipped steps) is
    the one GPUs use, so on such CPUs bigtx lifts the refusal and says so.
    """
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if torch.cuda.is_available() or accelerator.is_fp16_supported():
        return False
    accelerator.is_fp16_supported = lambda: True
    accelerator.supported_dtypes = lambda: [torch.float, torch.bfloat16, torch.float16]
    return True


def device(env: DistEnv) -> torch.device:
    return torch.device("cuda", env.local_rank) if torch.cuda.is_available() else torch.device("cpu")


class StopRequest:
    """Turns SIGTERM/SIGUSR1/SIGINT into a flag the loop polls; a second SIGINT exits at once.

    SLURM sends SIGUSR1 (``--signal``) or SIGTERM before a time limit or preemption. The flag is
    reduced across ranks every step, so all ranks stop at the same step boundary.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._sigints = 0
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            self._sigints += 1
            if self._sigints > 1:
                print("bigtx: second SIGINT, exiting now without a checkpoint", file=sys.stderr, flush=True)
                os._exit(130)
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


def device_of_backend() -> torch.device:
    """Where tensors for collectives must live: the GPU under NCCL, the CPU under gloo."""
    import torch.distributed as dist

    return torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")


def spawn_local(
    cmd: list[str],
    nproc: int,
    env: dict[str, str] | None = None,
    logs: list[Path] | None = None,
    cwd: Path | None = None,
) -> list[subprocess.Popen]:
    """Start ``nproc`` local ranks of ``cmd`` with the variables torchrun would set (gloo/NCCL on 127.0.0.1).

    Each rank writes to its own log file when ``logs`` is given. Used by the benchmarks and tests
    that need to signal or kill single ranks; users run ``bigtx launch local`` or ``deepspeed``.
    """
    port = free_port()
    procs = []
    for rank in range(nproc):
        rank_env = {
            **os.environ,
            **(env or {}),
            "RANK": str(rank),
            "WORLD_SIZE": str(nproc),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        out = logs[rank].open("w") if logs else None
        procs.append(
            subprocess.Popen(cmd, env=rank_env, stdout=out, stderr=subprocess.STDOUT if out else None, cwd=cwd)
        )
    return procs

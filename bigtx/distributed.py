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
import threading
from dataclasses import dataclass
from datetime import timedelta
from types import FrameType

import torch

from bigtx import lifetime

# `bigtx train` exit codes; the launchers requeue on EXIT_REQUEUE (EX_TEMPFAIL from sysexits.h).
EXIT_FINISHED = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_REQUEUE = 75
# A stop signal came, but no step boundary (where the rank could checkpoint) within the grace period.
EXIT_STOP_TIMEOUT = 143  # 128 + SIGTERM, what a shell reports for a process ended by SIGTERM

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


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
            # torchrun says LOCAL_WORLD_SIZE, DeepSpeed's launcher LOCAL_SIZE (zero.hpz_partition_size needs it)
            local_world_size=int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or env["WORLD_SIZE"]),
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
    """Collective timeout ($BIGTX_DIST_TIMEOUT_S, default 600): a dead peer becomes an error, never a hang."""
    return timedelta(seconds=lifetime.seconds_from_env("BIGTX_DIST_TIMEOUT_S", "600"))


# mallopt(3) parameter number from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3


def cap_mmap_threshold(limit: int = 2 << 20) -> bool:
    """Serve every allocation of ``limit`` bytes or more with its own mmap, so freeing it returns the
    memory to the system at once. Returns whether it was set (glibc only; a no-op elsewhere).

    glibc's threshold is dynamic: each freed mmapped chunk raises it to that chunk's size (up to 32
    MiB), so after the first big tensors are freed, later ones of that size come from the heap and
    stay in the process's resident memory after they are freed. Setting it fixes the threshold. Each
    mmapped allocation costs page faults, so the limit trades host memory for speed on the CPU
    (tools/bench_memory.py, 273M bf16 ZeRO-3 on 4 ranks: peak 2.00x the model states at 1 MiB, 2.08x
    at 2 MiB, 2.22x at 4 MiB, 3.18x unset; the ZeRO-3 step of tools/bench_train.py, 1.35x a bare
    DeepSpeed engine at 1 MiB, 0.97x at 2 MiB). On GPUs few host allocations are this big.
    """
    import ctypes
    import platform

    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    return bool(ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, limit))


def init(env: DistEnv) -> None:
    """Start the process group (gloo on CPU, NCCL on GPUs) through DeepSpeed.

    A rank started by a launcher is tied to it: if the launcher dies, the rank gets SIGTERM (and
    so checkpoints at the next step boundary, or leaves after the grace period) instead of running
    on as an orphan that holds the rendezvous port.
    """
    import deepspeed

    cap_mmap_threshold()
    if env.launcher != "single":
        lifetime.die_with_parent(signal.SIGTERM)

    os.environ.update(
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank),
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
    )
    # DeepSpeed builds its own groups with new_group(), which take torch's default timeout (30 min
    # for gloo, 10 min for NCCL), not the one passed here: a frozen peer would hang the job for that
    # long. new_group() reads these two module globals (checked against torch 2.5-2.13).
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = timeout()
    c10d.default_pg_nccl_timeout = timeout()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
        # the NCCL flight recorder, which a hang dump saves (bigtx.heartbeat), records only with a buffer;
        # torch >= 2.10 reads the first name, older ones the second
        os.environ.setdefault("TORCH_FR_BUFFER_SIZE", "2000")
        os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000")
    else:
        skip_shm_comm_op()
        if "OMP_NUM_THREADS" not in os.environ:
            # ranks on one box share its cores; oversubscription makes every rank slower
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.local_world_size))
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout(), verbose=False)


def skip_shm_comm_op() -> None:
    """Keep DeepSpeed's CPU process group from building its shared-memory all-reduce op.

    DeepSpeed compiles that op with the C++ compiler at every process-group start that finds it
    missing (about a minute on a fresh machine) and sets up shared memory between the ranks, yet only
    its ``inference_all_reduce`` uses it, which training never calls. An op marked incompatible is
    not built (checked against DeepSpeed 0.19.8: ``comm/torch.py``'s ``build_shm_op`` reads
    ``deepspeed.ops.__compatible_ops__``, a dict it caches on first access).
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


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


def fast_bf16() -> bool:
    """Whether bf16 is a fast precision here: any GPU bigtx runs on, or a CPU with bf16 kernels.

    On an AVX2-only CPU (AMD Zen 3, older Intel) torch falls back to a reference bf16 matmul that
    measured 38x slower than fp32 (torch 2.13, 512x256 @ 256x768, one thread, AMD EPYC Zen 3), so a
    bf16 run there is mostly waiting. ``torch.ops.mkldnn._is_mkldnn_bf16_supported`` (oneDNN's
    bf16 kernels: AVX-512, AMX) is private (checked with torch 2.13); without it the answer is True.
    """
    if torch.cuda.is_available():
        return True
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return True if probe is None else bool(probe())


def device(env: DistEnv) -> torch.device:
    return torch.device("cuda", env.local_rank) if torch.cuda.is_available() else torch.device("cpu")


class StopRequest:
    """Turns SIGTERM/SIGUSR1/SIGINT into a flag the loop polls, with a deadline for reaching it.

    SLURM sends SIGUSR1 (``--signal``) or SIGTERM before a time limit or preemption. The flag is
    reduced across ranks every step, so all ranks stop at the same step boundary and checkpoint;
    the loop calls ``acknowledge()`` there. A rank that does not get there within ``grace_s``
    seconds of the first signal (stuck in a read, a collective or a loop) leaves anyway: it ends
    its child processes and exits with ``EXIT_STOP_TIMEOUT``, without a checkpoint. The same
    SIGTERM or SIGINT a second time exits at once (128 + the signal's number). A Ctrl-C in a terminal
    reaches the ranks and DeepSpeed's launcher, which then sends SIGTERM: one of each still means
    "checkpoint and stop".

    Python runs signal handlers only between bytecodes of the main thread, so a rank blocked in C
    (a socket read, a gloo collective) would never see the flag. The C-level handler also writes
    the signal number to a wakeup pipe (``signal.set_wakeup_fd``); a watcher thread reads it and
    starts the deadline whatever the main thread is doing.
    """

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.signal_name: str | None = None
        self._counts: dict[signal.Signals, int] = {}
        self._lock = threading.Lock()
        self._acknowledged = threading.Event()
        self._timer: threading.Timer | None = None
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(read_fd,), name="bigtx-stop-watch", daemon=True).start()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # the watcher thread has already counted this signal and armed the deadline
        self.signal_name = self.signal_name or signal.Signals(signum).name

    def _watch(self, read_fd: int) -> None:
        while True:
            for signum in os.read(read_fd, 64):
                if signum in STOP_SIGNALS:
                    self._received(signal.Signals(signum))

    def _received(self, sig: signal.Signals) -> None:
        with self._lock:
            self._counts[sig] = self._counts.get(sig, 0) + 1
            self.signal_name = self.signal_name or sig.name
            if self._counts[sig] > 1 and sig != signal.SIGUSR1:
                _leave(f"second {sig.name}: exiting now without a checkpoint", 128 + int(sig))
            if self._timer is None:
                self._timer = threading.Timer(self.grace_s, self._expire)
                self._timer.daemon = True
                self._timer.start()

    def _expire(self) -> None:
        if not self._acknowledged.is_set():
            _leave(
                f"{self.signal_name} received {self.grace_s:g}s ago and no step boundary reached "
                f"(stuck in data loading, a collective or a loop?); exiting with {EXIT_STOP_TIMEOUT} "
                "without a checkpoint (BIGTX_STOP_GRACE_S sets the grace period)",
                EXIT_STOP_TIMEOUT,
            )

    def acknowledge(self) -> None:
        """The loop has reached the step boundary where it saves and exits: no deadline any more."""
        self._acknowledged.set()
        if self._timer is not None:
            self._timer.cancel()

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


def _leave(message: str, code: int) -> None:
    """Exit now from any thread: say why, end this rank's children (loader workers, pipes), skip teardown."""
    print(f"bigtx rank {os.environ.get('RANK', '0')}: {message}", file=sys.stderr, flush=True)
    lifetime.kill_children()
    os._exit(code)


def device_of_backend() -> torch.device:
    """Where tensors for collectives must live: the GPU under NCCL, the CPU under gloo."""
    import torch.distributed as dist

    return torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")

"""Start N local ranks the way torchrun does (RANK/WORLD_SIZE/MASTER_* in each one's environment).

For the benchmarks here and the tests (``tests/harness.py``), which signal or kill single ranks;
users run ``bigtx launch local``, ``deepspeed`` or ``torchrun``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from bigtx.distributed import free_port


def spawn_local(
    cmd: list[str],
    nproc: int,
    env: dict[str, str] | None = None,
    logs: list[Path] | None = None,
    cwd: Path | None = None,
) -> list[subprocess.Popen]:
    """Start ``nproc`` ranks of ``cmd`` on 127.0.0.1; each writes to its own log file when ``logs`` is given."""
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
        if out is not None:
            out.close()  # the rank has its own copy of the file descriptor
    return procs

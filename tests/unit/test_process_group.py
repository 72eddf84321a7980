"""Starting the CPU process group (``bigtx.distributed.init``): no C++ build on the way."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bigtx.distributed import free_port
from tests.harness import base_env

_START = """
import os, sys
from bigtx import distributed
env = distributed.DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1,
                          master_addr="127.0.0.1", master_port=int(sys.argv[1]), launcher="single")
distributed.init(env)
import torch.distributed as dist
print("world", dist.get_world_size(), flush=True)
os._exit(0)  # as bigtx.train leaves: no interpreter teardown under DeepSpeed's threads
"""


def test_the_gloo_group_starts_without_building_deepspeeds_shared_memory_op(tmp_path: Path) -> None:
    """In an empty torch-extensions cache, DeepSpeed would compile its shm all-reduce op (a minute, with
    g++) and print that it built it; bigtx marks the op unused, so nothing is built."""
    env = {**base_env(), "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}
    done = subprocess.run(
        [sys.executable, "-c", _START, str(free_port())], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "world 1" in done.stdout
    assert "shm_comm" not in done.stdout + done.stderr
    assert not (tmp_path / "extensions").exists() or not any((tmp_path / "extensions").iterdir())

"""The harness itself: a plain sbatch job whose srun starts one torch gloo rank on each node."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.slurm.cluster import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ALL_REDUCE = """\
import os, socket
import torch, torch.distributed as dist

rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
addr = f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
dist.init_process_group("gloo", init_method=addr, rank=rank, world_size=world)
t = torch.tensor([rank + 1.0])
dist.all_reduce(t)
print(f"rank {rank}/{world} on {socket.gethostname()}: sum {t.item():g}", flush=True)
dist.destroy_process_group()
"""

JOB = """\
#!/bin/bash
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --output={out}
first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR=$(scontrol show node "$first" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
export GLOO_SOCKET_IFNAME=eth0
srun {python} {script}
"""


def test_gloo_all_reduce_across_two_nodes(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    script = tmp_path / "all_reduce.py"
    script.write_text(ALL_REDUCE)
    out = tmp_path / "job.out"
    job = tmp_path / "job.sbatch"
    job.write_text(JOB.format(out=out, python=sys.executable, script=script))
    job_id = slurm_cluster.sbatch(job)
    slurm_cluster.wait_for(job_id, {"COMPLETED"}, timeout=120)
    lines = sorted(line for line in out.read_text().splitlines() if line.startswith("rank "))
    assert lines == ["rank 0/2 on n1: sum 3", "rank 1/2 on n2: sum 3"], out.read_text()

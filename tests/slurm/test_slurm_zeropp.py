"""ZeRO++ hpZ on a real two-node cluster, two CPU ranks per node: the tiny model in fp32 with ZeRO-3.

With zero.hpz_partition_size=2 each node keeps a secondary copy of the weights, partitioned over its
own two ranks, built when the weights are first gathered after an optimizer step; the step's later
all-gathers (the backward's) run inside the node. The arithmetic is the same as without it, so the
per-step losses must equal those of the same run without hpZ (measured: bit for bit). A job takes
~30 s here, almost all of it four ranks importing torch and DeepSpeed on two shared cores.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import metrics, tiny_overrides
from tests.slurm.cluster import SlurmCluster
from tests.slurm.test_slurm_launch import RANK_ENV, run_job

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STEPS = 8
TOLERANCE = 1e-5


def render(workdir: Path, shards: Path, *overrides: str) -> Path:
    """`bigtx launch slurm tiny` for 2 nodes x 2 CPU ranks, fp32 ZeRO-3, no checkpoints; returns the script."""
    workdir.mkdir(parents=True, exist_ok=True)
    # Make the tiny model behave like a big one, so that hpZ has work in every step: every parameter
    # partitioned (ZeRO-3 keeps those under 1e5 elements whole on every rank, all of the tiny
    # model's), and each released after its forward use (a small model's would stay gathered until
    # the backward, which then needs no secondary copy).
    base = workdir / "partition_all.json"
    zero = {"stage3_param_persistence_threshold": 0, "stage3_max_reuse_distance": 0}
    base.write_text(json.dumps({"zero_optimization": zero}))
    sets = tiny_overrides(
        workdir / "run",
        shards,
        f"train.max_steps={STEPS}",
        "train.eval_every=0",
        "precision=fp32",
        "zero.stage=3",
        "checkpoint.every_steps=0",
        "checkpoint.save_at_end=false",
        f"deepspeed.base={base}",
        *overrides,
    )
    cmd = [sys.executable, "-m", "bigtx", "launch", "slurm", "tiny", "--nodes", "2", "--gpus-per-node", "2"]
    cmd += ["--no-gres", *(f"--env={e}" for e in RANK_ENV), *(f"--set={o}" for o in sets)]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return Path(re.search(r"^script: +(\S+)$", proc.stdout, re.M).group(1))


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def test_hpz_losses_equal_the_run_without_it(slurm_cluster: SlurmCluster, byte_shards: Path, tmp_path: Path) -> None:
    runs = {}
    for name, extra in (("plain", ()), ("hpz", ("zero.hpz_partition_size=2",))):
        script = render(tmp_path / name, byte_shards, *extra)
        run_job(slurm_cluster, script)
        runs[name] = script.parents[1]
    for run_dir in runs.values():
        # ranks 0,1 on n1 and 2,3 on n2: DeepSpeed's hpZ groups [0,1] and [2,3] are the nodes
        assert "ranks on hosts: 0:n1, 1:n1, 2:n2, 3:n2" in (run_dir / "train.log").read_text()
    assert '"zero_hpz_partition_size": 2' in (runs["hpz"] / "spec.yaml").read_text()
    assert "zero_hpz_partition_size" not in (runs["plain"] / "spec.yaml").read_text()
    plain, hpz = losses(runs["plain"]), losses(runs["hpz"])
    assert sorted(plain) == sorted(hpz) == list(range(1, STEPS + 1))
    differ = {s: (plain[s], hpz[s]) for s in plain if abs(plain[s] - hpz[s]) > TOLERANCE}
    assert not differ, f"per-step losses (without hpZ, with hpZ) differ by more than {TOLERANCE}: {differ}"

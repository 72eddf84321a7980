"""A stuck rank on the real SLURM cluster: one rank of a job on n2 is SIGSTOPped. Its peer dumps its
stacks and times out, the job ends, `bigtx doctor` (run by the batch script, --exclude-stuck-node)
names the stopped rank and n2, and the script submits itself again without n2: the new job runs
on n1, resumes from the last checkpoint and finishes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import metrics, tiny_overrides, wait_until
from tests.slurm.cluster import SlurmCluster
from tests.slurm.test_slurm_launch import logs, train_steps

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STEPS = 60
RANK_ENV = ["GLOO_SOCKET_IFNAME=eth0", "OMP_NUM_THREADS=1", "BIGTX_DIST_TIMEOUT_S=12", "BIGTX_STOP_GRACE_S=5"]


def test_a_stopped_rank_is_named_and_its_node_left_out(
    slurm_cluster: SlurmCluster, byte_shards: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(
        run_dir, byte_shards, f"train.max_steps={STEPS}", "checkpoint.every_steps=20", "watchdog.floor_s=2"
    )
    cmd = [
        sys.executable,
        "-m",
        "bigtx",
        "launch",
        "slurm",
        "tiny",
        "--nodes=1",
        "--gpus-per-node=2",
        "--no-gres",
        "--exit-wait=5",
        "--exclude-stuck-node",
        *(f"--env={e}" for e in RANK_ENV),
        *(f"--set={o}" for o in overrides),
    ]
    rendered = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert rendered.returncode == 0, rendered.stderr
    script = Path(re.search(r"^script: +(\S+)$", rendered.stdout, re.M).group(1))

    job_id = slurm_cluster.sbatch(script, args=["--nodelist=n2"])
    wait_until(lambda: (run_dir / "metrics.jsonl").exists() and len(metrics(run_dir)) >= 25, 120, "step 25")
    stopped = json.loads((run_dir / "heartbeat" / "rank1.json").read_text())["pid"]
    os.kill(stopped, signal.SIGSTOP)
    try:
        # 12 s collective timeout, 5 s exit wait, SLURM's kill, two `bigtx doctor` runs
        slurm_cluster.wait_for(job_id, {"FAILED"}, 90)
    except Exception as exc:
        raise AssertionError(f"{exc}\n{logs(run_dir)}") from None
    finally:
        try:
            os.kill(stopped, signal.SIGKILL)  # whatever SLURM did with it
        except ProcessLookupError:
            pass

    job_log = (run_dir / "logs" / f"slurm-{job_id}.out").read_text()
    assert re.search(rf"rank 1 on host n2 \(pid {stopped}\) is stuck", job_log), job_log
    assert re.search(r"rank 0 on host n2 \(pid \d+\) waited in phase \w+ of step \d+ .*top of stack: ", job_log)
    assert list((run_dir / "hang").glob("rank0-*.txt")), "rank 0 wrote no stack dump"
    assert f"bigtx doctor finds node(s) n2 stuck: submitting {script} again with --exclude=n2" in job_log
    resubmitted = int(re.search(r"^Submitted batch job (\d+)$", job_log, re.M).group(1))
    try:
        slurm_cluster.wait_for(resubmitted, {"COMPLETED"}, 180)
    except Exception as exc:
        raise AssertionError(f"{exc}\n{logs(run_dir)}") from None
    info = slurm_cluster.job_info(resubmitted)
    assert (info["NodeList"], info["ExcNodeList"]) == ("n1", "n2")
    assert (run_dir / "FINISHED").exists()
    assert "ranks on hosts: 0:n1, 1:n1" in (run_dir / "train.log").read_text()
    assert train_steps(run_dir) == list(range(1, STEPS + 1))  # the lines after the checkpoint were logged again

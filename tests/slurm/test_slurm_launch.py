"""`bigtx launch slurm` on a real two-node cluster: the tiny model with ZeRO-2, one CPU rank per node.

Every job is rendered by the real CLI and trains for real. The uninterrupted srun-mode run is the
reference: the other modes and every interrupted run must reproduce its per-step losses bit for
bit (same world size, CPU, same data order).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness import metrics, tiny_overrides, wait_until
from tests.slurm.cluster import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STEPS = 150
CKPT_EVERY = 50
JOB_TIMEOUT = 240  # seconds; a job takes about 15 on an idle 2-core machine
# gloo must use the nodes' veth (it picks an interface by host name otherwise); one thread per
# rank, as the two "nodes" share the machine's cores.
RANK_ENV = ["GLOO_SOCKET_IFNAME=eth0", "OMP_NUM_THREADS=1", "BIGTX_DIST_TIMEOUT_S=30"]


def render(workdir: Path, shards: Path, *launch_args: str) -> Path:
    """`bigtx launch slurm tiny` for 2 nodes x 1 CPU rank into ``workdir/run``; returns the script."""
    workdir.mkdir(parents=True, exist_ok=True)
    overrides = tiny_overrides(
        workdir / "run", shards, f"train.max_steps={STEPS}", f"checkpoint.every_steps={CKPT_EVERY}", "zero.stage=2"
    )
    cmd = [
        sys.executable,
        "-m",
        "bigtx",
        "launch",
        "slurm",
        "tiny",
        "--nodes",
        "2",
        "--gpus-per-node",
        "1",
        "--no-gres",
        *(f"--env={e}" for e in RANK_ENV),
        *launch_args,
        *(f"--set={o}" for o in overrides),
    ]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    script = Path(re.search(r"^script: +(\S+)$", proc.stdout, re.M).group(1))
    assert script.parent == workdir / "run" / "launch"
    return script


def logs(run_dir: Path) -> str:
    """The tail of every log of the run, for assertion messages."""
    out = []
    for path in sorted((run_dir / "logs").glob("*")) + [run_dir / "train.log"]:
        if path.is_file():
            out.append(f"--- {path.name} ---\n" + "\n".join(path.read_text(errors="replace").splitlines()[-25:]))
    return "\n".join(out)


def run_job(cluster: SlurmCluster, script: Path) -> int:
    job_id = cluster.sbatch(script)
    try:
        cluster.wait_for(job_id, {"COMPLETED"}, JOB_TIMEOUT)
    except Exception as exc:
        raise AssertionError(f"{exc}\n{logs(script.parents[1])}") from None
    return job_id


def train_steps(run_dir: Path) -> list[int]:
    """Steps of the training records, in file order (duplicates kept)."""
    return [r["step"] for r in metrics(run_dir) if "loss" in r]


def assert_same_losses(run_dir: Path, reference: Path) -> None:
    """Every step's loss, grad norm and lr equal the reference run's, bit for bit."""
    steps = train_steps(run_dir)
    assert steps == list(range(1, STEPS + 1)), f"steps not contiguous: {steps}"
    ref = {r["step"]: r for r in metrics(reference) if "loss" in r}
    for r in metrics(run_dir):
        if "loss" in r:
            for key in ("loss", "grad_norm", "lr"):
                assert r[key] == ref[r["step"]][key], f"step {r['step']} {key}: {r[key]!r} != {ref[r['step']][key]!r}"


def complete_checkpoints(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*/COMPLETE.json"))


@pytest.fixture(scope="module")
def reference(slurm_cluster: SlurmCluster, byte_shards: Path, tmp_path_factory: pytest.TempPathFactory):
    """The uninterrupted run, srun mode: (script, job id)."""
    script = render(tmp_path_factory.mktemp("reference"), byte_shards)
    return script, run_job(slurm_cluster, script)


def test_srun_mode_trains_on_both_nodes(reference: tuple[Path, int]) -> None:
    script, job_id = reference
    run_dir = script.parents[1]
    assert (run_dir / "FINISHED").exists()
    assert train_steps(run_dir) == list(range(1, STEPS + 1))
    assert complete_checkpoints(run_dir)[-1] == STEPS
    # one rank per node, each with its own log named after rank and node
    assert sorted(p.name for p in (run_dir / "logs").glob(f"{job_id}.0-rank*.log")) == [
        f"{job_id}.0-rank0-n1.log",
        f"{job_id}.0-rank1-n2.log",
    ]
    assert "ranks on hosts: 0:n1, 1:n2" in (run_dir / "train.log").read_text()
    job_log = (run_dir / "logs" / f"slurm-{job_id}.out").read_text()
    assert f"TensorBoard: tensorboard --logdir {run_dir / 'tb'}" in job_log
    assert "ranks exited with 0" in job_log


def test_finished_run_is_not_started_again(slurm_cluster: SlurmCluster, reference: tuple[Path, int]) -> None:
    """A late requeue or resubmission of a finished run exits 0 without starting any rank."""
    script, _ = reference
    run_dir = script.parents[1]
    job_id = run_job(slurm_cluster, script)
    assert "FINISHED exists: the run is complete" in (run_dir / "logs" / f"slurm-{job_id}.out").read_text()
    assert not list((run_dir / "logs").glob(f"{job_id}.*-rank*.log"))


def test_deepspeed_mode_matches_srun_mode(
    slurm_cluster: SlurmCluster, byte_shards: Path, reference: tuple[Path, int], tmp_path: Path
) -> None:
    """DeepSpeed's own slurm launcher (hostfile -> srun) runs the same training, bit for bit."""
    script = render(tmp_path, byte_shards, "--mode=deepspeed")
    run_dir = script.parents[1]
    job_id = run_job(slurm_cluster, script)
    job_log = (run_dir / "logs" / f"slurm-{job_id}.out").read_text()
    assert re.search(r"cmd = srun -n 2 ", job_log), job_log  # DeepSpeed built and ran the srun command
    assert (run_dir / "launch" / f"hostfile.{job_id}.0").read_text() == "n1 slots=1\nn2 slots=1\n"
    assert "ranks on hosts: 0:n1, 1:n2" in (run_dir / "train.log").read_text()
    assert_same_losses(run_dir, reference[0].parents[1])


@pytest.fixture(scope="module")
def preempted(slurm_cluster: SlurmCluster, byte_shards: Path, tmp_path_factory: pytest.TempPathFactory):
    """What SLURM does GRACE seconds before the time limit, sent by hand once the run is at step 20:
    (script, job id) of a run that checkpointed, requeued itself and finished."""
    script = render(tmp_path_factory.mktemp("preempted"), byte_shards)
    run_dir = script.parents[1]
    job_id = slurm_cluster.sbatch(script)
    wait_until(lambda: (run_dir / "metrics.jsonl").exists() and len(train_steps(run_dir)) >= 20, 120, "step 20")
    slurm_cluster.scancel("--signal=USR1", "--batch", str(job_id))
    try:
        slurm_cluster.wait_for(job_id, {"COMPLETED"}, JOB_TIMEOUT)
    except Exception as exc:
        raise AssertionError(f"{exc}\n{logs(run_dir)}") from None
    return script, job_id


def test_usr1_checkpoints_requeues_and_resumes(slurm_cluster: SlurmCluster, preempted: tuple[Path, int]) -> None:
    script, job_id = preempted
    run_dir = script.parents[1]
    assert slurm_cluster.job_info(job_id)["Restarts"] == "1"
    job_log = (run_dir / "logs" / f"slurm-{job_id}.out").read_text()
    assert "SIGUSR1: asking the ranks to checkpoint and stop" in job_log
    assert "ranks exited with 75" in job_log and f"requeueing job {job_id}" in job_log
    assert (run_dir / "logs" / f"{job_id}.1-rank0-n1.log").exists()  # the requeued run's logs
    train_log = (run_dir / "train.log").read_text()
    stopped = re.search(r"stop requested \(SIGUSR1\): checkpointed at step (\d+)", train_log)
    assert stopped and 20 <= int(stopped.group(1)) < STEPS, train_log
    assert f"at step {stopped.group(1)} " in train_log.split("resumed from", 1)[1], train_log
    assert train_steps(run_dir) == list(range(1, STEPS + 1))  # nothing repeated, nothing lost
    assert (run_dir / "FINISHED").exists()


def test_requeued_run_matches_the_uninterrupted_one(preempted: tuple[Path, int], reference: tuple[Path, int]) -> None:
    assert_same_losses(preempted[0].parents[1], reference[0].parents[1])


def test_dead_node_fails_the_job_and_a_resubmission_resumes(
    slurm_cluster: SlurmCluster, byte_shards: Path, reference: tuple[Path, int], tmp_path: Path
) -> None:
    """Everything of the job on n2 is SIGKILLed mid-run. The job must fail, not hang: rank 0 loses
    its peer, and srun ends the step EXIT_WAIT seconds after the first rank exited even though n2's
    slurmstepd never reports back. Resubmitting the same script resumes from the newest complete
    checkpoint and ends with exactly the reference's losses."""
    script = render(tmp_path, byte_shards, "--exit-wait=5")
    run_dir = script.parents[1]
    job_id = slurm_cluster.sbatch(script)
    first = run_dir / "checkpoints" / f"step_{CKPT_EVERY:08d}" / "COMPLETE.json"
    wait_until(lambda: first.exists(), 120, str(first), interval=0.05)
    for pid in slurm_cluster.job_pids("n2"):
        os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    try:
        slurm_cluster.wait_for(job_id, {"FAILED"}, 90)
    except Exception as exc:
        raise AssertionError(f"{exc}\n{logs(run_dir)}") from None
    took = time.monotonic() - killed
    assert took < 60, f"the job took {took:.0f}s to fail"
    assert not (run_dir / "FINISHED").exists(), "the run finished before n2 was killed"
    newest = complete_checkpoints(run_dir)[-1]
    assert CKPT_EVERY <= newest < STEPS

    run_job(slurm_cluster, script)
    resumed = (run_dir / "train.log").read_text().split("resumed from", 1)[1].splitlines()[0]
    assert f"step_{newest:08d} at step {newest} " in resumed
    assert_same_losses(run_dir, reference[0].parents[1])


def test_frozen_node_fails_on_the_process_group_timeout(
    slurm_cluster: SlurmCluster, byte_shards: Path, tmp_path: Path
) -> None:
    """n2 hangs (every process of the job there stopped, sockets open): rank 0 must give up after
    BIGTX_DIST_TIMEOUT_S, and srun end the step EXIT_WAIT seconds later."""
    script = render(tmp_path, byte_shards, "--exit-wait=5", "--env=BIGTX_DIST_TIMEOUT_S=15")
    run_dir = script.parents[1]
    job_id = slurm_cluster.sbatch(script)
    first = run_dir / "checkpoints" / f"step_{CKPT_EVERY:08d}" / "COMPLETE.json"
    wait_until(lambda: first.exists(), 120, str(first), interval=0.05)
    frozen = slurm_cluster.job_pids("n2")
    try:
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        # 15 s timeout + 5 s exit wait, with room to spare. The job then stays COMPLETING until SLURM
        # gives up on the frozen slurmstepd of n2; what matters is that the ranks no longer hang.
        slurm_cluster.wait_for(job_id, {"FAILED", "COMPLETING"}, 60)
        assert "Timed out" in logs(run_dir)
    finally:
        # end what is left of the job at once (rank 0 may still hang in a collective)
        for pid in frozen + slurm_cluster.job_pids("n1"):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        slurm_cluster.scancel(str(job_id))

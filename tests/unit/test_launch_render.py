"""The SLURM batch script: what `bigtx launch slurm` renders, and how the script behaves.

The behaviour tests run the rendered script with bash against stand-ins for scontrol, srun and
scancel that record their arguments; the real cluster runs it in tests/slurm.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from bigtx.cli.main import main
from bigtx.config import load_spec
from bigtx.distributed import EXIT_REQUEUE
from bigtx.launch import local, slurm
from tests.harness import wait_until

BASH = shutil.which("bash")


def render(tmp_path: Path, **opts) -> str:
    options = slurm.SlurmOptions(**{"nodes": 2, "gpus_per_node": 4, **opts})
    return slurm.render_script(
        slurm.default_template().read_text(),
        options,
        run_dir=tmp_path / "run",
        spec_path=tmp_path / "run" / "launch" / "bigtx-x.yaml",
        workdir=tmp_path,
        job_name="bigtx-x",
        script_path=tmp_path / "run" / "launch" / "bigtx-x.sbatch",
    )


def sbatch_lines(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]


# ---- rendering ------------------------------------------------------------------------------


def test_sbatch_lines(tmp_path: Path) -> None:
    script = render(
        tmp_path, partition="gpu", time="2-00:00:00", account="proj", cpus_per_task=8, grace=600,
        sbatch_options=["--qos=high"],
    )  # fmt: skip
    assert sbatch_lines(script) == [
        "--job-name=bigtx-x",
        "--nodes=2",
        "--ntasks-per-node=4",
        "--gres=gpu:4",
        "--cpus-per-task=8",
        "--partition=gpu",
        "--account=proj",
        "--time=2-00:00:00",
        "--qos=high",
        f"--chdir={tmp_path}",
        f"--output={tmp_path}/run/logs/slurm-%j.out",
        "--open-mode=append",
        "--requeue",
        "--signal=B:USR1@600",
    ]
    assert script.startswith("#!/bin/bash\n")
    assert "{{" not in script and "}}" not in script


def test_cpu_cluster_has_no_gres_and_optional_lines_vanish(tmp_path: Path) -> None:
    lines = sbatch_lines(render(tmp_path, gres=False, gpus_per_node=1))
    assert "--ntasks-per-node=1" in lines
    assert not [line for line in lines if re.match(r"--(gres|partition|account|time|cpus-per-task)", line)]


def test_requeue_exit_code_matches_the_trainer(tmp_path: Path) -> None:
    assert f"BIGTX_EXIT_REQUEUE={EXIT_REQUEUE}\n" in render(tmp_path)


def test_env_values_are_quoted(tmp_path: Path) -> None:
    value = "a b'c\"$HOME"
    script = render(tmp_path, env={"GLOO_SOCKET_IFNAME": "eth0", "ODD": value})
    exports = "\n".join(line for line in script.splitlines() if line.startswith("export ") and "MASTER" not in line)
    out = subprocess.run([BASH, "-c", exports + '\nprintf %s "$ODD"'], capture_output=True, text=True, check=True)
    assert out.stdout == value
    assert "export GLOO_SOCKET_IFNAME=eth0\n" in script


@pytest.mark.parametrize("mode", slurm.MODES)
def test_rendered_script_is_valid_bash(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "job.sbatch"
    path.write_text(render(tmp_path, mode=mode, env={"X": "1"}, time="10:00"))
    subprocess.run([BASH, "-n", str(path)], check=True)


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        ({"nodes": 0}, "--nodes"),
        ({"gpus_per_node": 0}, "--gpus-per-node"),
        ({"grace": 0}, "--grace"),
        ({"grace": 600, "time": "00:05:00"}, "--grace"),
        ({"time": "soon"}, "--time"),
        ({"env": {"1BAD": "x"}}, "--env"),
        ({"sbatch_options": ["qos=high"]}, "--sbatch-option"),
        ({"partition": "a b"}, "--partition"),
        ({"exit_wait": -1}, "--exit-wait"),
    ],
)
def test_bad_options_name_the_option(tmp_path: Path, opts: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        render(tmp_path, **opts)


def test_run_dir_with_white_space_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="white space"):
        render(tmp_path / "my runs")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30", 1800), ("30:15", 1815), ("01:00:00", 3600), ("2-00", 172800), ("2-01:30", 178200),
     ("1-00:00:10", 86410), ("UNLIMITED", None)],
)  # fmt: skip
def test_time_limits(text: str, seconds: int | None) -> None:
    assert slurm.time_limit_seconds(text) == seconds


def test_template_fields() -> None:
    assert slurm.fill_template("a {{x}}\n{{y}}\nb\n", {"x": "1", "y": ""}) == "a 1\nb\n"
    with pytest.raises(ValueError, match=r"\{\{z\}\}"):
        slurm.fill_template("{{z}}", {})


# ---- the CLI --------------------------------------------------------------------------------


def test_cli_writes_spec_copy_and_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["--nodes", "2", "--gpus-per-node", "1", "--no-gres", "--env", "GLOO_SOCKET_IFNAME=eth0"]
    code = main(["launch", "slurm", "tiny", *args, "--set", "train.max_steps=12", "--set", "run.dir=runs/x"])
    assert code == 0
    launch = tmp_path / "runs" / "x" / "launch"
    script, spec_copy = launch / "bigtx-tiny.sbatch", launch / "bigtx-tiny.yaml"
    assert f"script: {script}" in capsys.readouterr().out
    assert os.access(script, os.X_OK) and (tmp_path / "runs" / "x" / "logs").is_dir()
    # the copy is the resolved spec with the overrides baked in, and loads back to the same spec
    assert yaml.safe_load(spec_copy.read_text())["train"]["max_steps"] == 12
    assert load_spec(str(spec_copy)) == load_spec("tiny", ["train.max_steps=12", "run.dir=runs/x"])
    text = script.read_text()
    assert f"SPEC={spec_copy}" in text and f"RUN_DIR={tmp_path}/runs/x\n" in text
    assert f"PYTHON={sys.executable}" in text
    assert "--gres" not in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "model.n_heads=5"], "invalid run spec"),
        (["--nodes", "3", "--set", "train.global_batch_size=8"], "world size 3"),
        (["--grace", "0"], "--grace"),
        (["--env", "NOEQUALS"], "--env"),
    ],
)
def test_cli_errors_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, args, message) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["launch", "slurm", "tiny", *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_local_command() -> None:
    cmd = local.local_command("tiny", ["train.max_steps=3"], 2, python="/py", master_port=29511)
    assert cmd == ["/py", "-u", "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29511",
                   "--module", "--no_local_rank", "bigtx", "train", "tiny", "--set", "train.max_steps=3"]  # fmt: skip
    with pytest.raises(ValueError, match="--nproc"):
        local.local_command("tiny", [], 0)


# ---- the script's behaviour, against stand-ins for the SLURM commands --------------------------

STUBS = {
    # scontrol: the allocation is n1,n2; n1's address; `requeue` is recorded
    "scontrol": """\
case "$1 $2" in
  "show hostnames") printf 'n1\\nn2\\n' ;;
  "show node") echo "NodeName=$3 Arch=x86_64 CoresPerSocket=1"; echo "   NodeAddr=10.0.0.${3#n} NodeHostName=$3" ;;
  "show job") echo "JobId=$3 JobName=x"; echo "   ReqNodeList=(null) ExcNodeList=${EXCLUDED:-(null)}" ;;
  *) echo "scontrol $*" >> "$CALLS" ;;
esac""",
    "sbatch": 'echo "sbatch $*" >> "$CALLS"',
    "scancel": 'echo "scancel $*" >> "$CALLS"; [ -z "${SCANCEL_FAILS:-}" ] || exit 1; touch "$STUB_DIR/signalled"',
    # srun (or DeepSpeed's runner, via the fake python): record, then behave as $RANKS says
    "srun": 'exec "$STUB_DIR/ranks" srun "$@"',
    "python": 'exec "$STUB_DIR/ranks" python "$@"',
    "ranks": """\
echo "$* MASTER=$MASTER_ADDR:$MASTER_PORT" >> "$CALLS"
# `bigtx doctor`: a report, or with --stuck-nodes the nodes in $STUCK
case "$*" in
  *"bigtx doctor"*--stuck-nodes*) echo "$STUCK"; exit 1 ;;
  *"bigtx doctor"*) echo "runs/x: stuck"; exit 1 ;;
esac
trap 'echo "$1 got USR1" >> "$CALLS"; touch "$STUB_DIR/signalled"' USR1
case "$RANKS" in
  exit*) exit "${RANKS#exit }" ;;
  # checkpoint and exit 75 once the job's steps were signalled, like bigtx train
  until-signalled) while [ ! -e "$STUB_DIR/signalled" ]; do sleep 0.05; done; exit 75 ;;
esac""",
}


@pytest.fixture
def stubs(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STUBS.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir


def start_script(
    tmp_path: Path, stubs: Path, ranks: str, extra_env: dict[str, str] | None = None, **opts
) -> tuple[subprocess.Popen, Path]:
    run_dir = tmp_path / "run"
    (run_dir / "launch").mkdir(parents=True, exist_ok=True)
    (run_dir / "logs").mkdir(exist_ok=True)
    path = tmp_path / "job.sbatch"
    path.write_text(render(tmp_path, python=str(stubs / "python"), **opts))
    calls = tmp_path / "calls"
    calls.write_text("")
    env = {
        "PATH": f"{stubs}:{os.environ['PATH']}",
        "CALLS": str(calls),
        "STUB_DIR": str(stubs),
        "RANKS": ranks,
        "SLURM_JOB_ID": "4321",
        "SLURM_JOB_NODELIST": "n[1-2]",
        "SLURM_JOB_NUM_NODES": "2",
        **(extra_env or {}),
    }
    return subprocess.Popen(
        [BASH, str(path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ), calls


def run_script(tmp_path: Path, stubs: Path, ranks: str, **opts) -> tuple[int, str, list[str]]:
    proc, calls = start_script(tmp_path, stubs, ranks, **opts)
    out, _ = proc.communicate(timeout=30)
    return proc.returncode, out, calls.read_text().splitlines()


def test_srun_mode_starts_one_rank_per_task(tmp_path: Path, stubs: Path) -> None:
    code, out, calls = run_script(tmp_path, stubs, "exit 0")
    assert code == 0, out
    run_dir = tmp_path / "run"
    # the rendezvous: n1's NodeAddr and a port derived from the job id
    assert calls == [
        f"srun --output={run_dir}/logs/4321.0-rank%t-%N.log --open-mode=append --wait=300 "
        f"{stubs}/python -u -m bigtx train {run_dir}/launch/bigtx-x.yaml MASTER=10.0.0.1:24321"
    ]
    assert "ranks exited with 0" in out and f"tensorboard --logdir {run_dir}/tb" in out


def test_deepspeed_mode_writes_a_hostfile(tmp_path: Path, stubs: Path) -> None:
    code, out, calls = run_script(tmp_path, stubs, "exit 0", mode="deepspeed", exit_wait=60)
    assert code == 0, out
    run_dir = tmp_path / "run"
    assert (run_dir / "launch" / "hostfile.4321.0").read_text() == "n1 slots=4\nn2 slots=4\n"
    assert calls == [
        f"python -u -m deepspeed.launcher.runner --hostfile {run_dir}/launch/hostfile.4321.0 --launcher slurm "
        "--force_multi --no_ssh_check --master_addr 10.0.0.1 --master_port 24321 "
        f"--launcher_args --output={run_dir}/logs/4321.0-rank%t-%N.log --open-mode=append --wait=60 "
        f"{stubs}/bigtx train {run_dir}/launch/bigtx-x.yaml MASTER=10.0.0.1:24321"
    ]


def test_finished_run_starts_nothing(tmp_path: Path, stubs: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "FINISHED").write_text("step 10\n")
    code, out, calls = run_script(tmp_path, stubs, "exit 1")
    assert code == 0 and calls == [] and "the run is complete" in out


@pytest.mark.parametrize("rank_code", [0, 1, 2])
def test_exit_code_is_the_ranks_and_only_75_requeues(tmp_path: Path, stubs: Path, rank_code: int) -> None:
    code, out, calls = run_script(tmp_path, stubs, f"exit {rank_code}")
    assert code == rank_code and not [c for c in calls if c.startswith("scontrol")]


def test_exit_75_requeues(tmp_path: Path, stubs: Path) -> None:
    code, out, calls = run_script(tmp_path, stubs, f"exit {EXIT_REQUEUE}")
    assert calls[-1] == "scontrol requeue 4321"
    assert code == 0 and "requeueing job 4321" in out


@pytest.mark.parametrize(
    "env, exclude",
    [({"STUCK": "n2"}, "n2"), ({"STUCK": "n2", "EXCLUDED": "n7"}, "n7,n2"), ({"STUCK": ""}, None)],
)
def test_failed_ranks_resubmit_without_the_stuck_node(tmp_path: Path, stubs: Path, env: dict, exclude: str) -> None:
    proc, calls = start_script(tmp_path, stubs, "exit 1", env, exclude_stuck_node=True)
    out, _ = proc.communicate(timeout=30)
    lines = calls.read_text().splitlines()
    doctor = f"python -m bigtx doctor {tmp_path}/run"
    assert [line.split(" MASTER=")[0] for line in lines[1:3]] == [doctor, f"{doctor} --stuck-nodes"], out
    assert proc.returncode == 1 and "runs/x: stuck" in out
    script = tmp_path / "run" / "launch" / "bigtx-x.sbatch"
    if exclude is None:
        assert not [line for line in lines if line.startswith(("sbatch", "scontrol"))]
    else:
        assert lines[-1] == f"sbatch --exclude={exclude} {script}"
        assert f"bigtx doctor finds node(s) n2 stuck: submitting {script} again with --exclude={exclude}" in out


@pytest.mark.parametrize("rank_code, option", [(1, False), (EXIT_REQUEUE, True), (0, True)])
def test_no_doctor_without_the_option_or_a_failure(tmp_path: Path, stubs: Path, rank_code: int, option: bool) -> None:
    proc, calls = start_script(tmp_path, stubs, f"exit {rank_code}", {"STUCK": "n2"}, exclude_stuck_node=option)
    out, _ = proc.communicate(timeout=30)
    lines = calls.read_text().splitlines()
    assert not [line for line in lines if "bigtx doctor" in line or line.startswith("sbatch")], out


def wait_for_ranks(proc: subprocess.Popen, calls: Path) -> None:
    deadline = time.monotonic() + 20
    while "srun" not in calls.read_text():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)


def test_usr1_is_forwarded_to_the_ranks_then_the_job_requeues(tmp_path: Path, stubs: Path) -> None:
    proc, calls = start_script(tmp_path, stubs, "until-signalled")
    wait_for_ranks(proc, calls)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@GRACE does
    out, _ = proc.communicate(timeout=30)
    lines = calls.read_text().splitlines()
    assert lines[1:] == ["scancel --signal=USR1 4321", "scontrol requeue 4321"], out
    assert proc.returncode == 0
    assert "SIGUSR1: asking the ranks to checkpoint" in out and "ranks exited with 75" in out


def test_usr1_goes_to_srun_when_scancel_fails(tmp_path: Path, stubs: Path) -> None:
    proc, calls = start_script(tmp_path, stubs, "until-signalled", {"SCANCEL_FAILS": "1"})
    wait_for_ranks(proc, calls)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    lines = calls.read_text().splitlines()
    assert lines[1:] == ["scancel --signal=USR1 4321", "srun got USR1", "scontrol requeue 4321"], out


def test_sigterm_does_not_requeue(tmp_path: Path, stubs: Path) -> None:
    """scancel/preemption: SLURM signals the ranks itself, and the script must not requeue."""
    proc, calls = start_script(tmp_path, stubs, "until-signalled")
    wait_for_ranks(proc, calls)
    proc.send_signal(signal.SIGTERM)
    (stubs / "signalled").touch()  # SLURM's SIGTERM to the ranks
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_REQUEUE, out
    assert not [c for c in calls.read_text().splitlines() if c.startswith(("scontrol", "scancel"))]
    assert "not requeueing" in out


# A stand-in for DeepSpeed's runner -> launch -> ranks tree: each rank exits 75 on SIGUSR1. With
# "stubborn" the ranks ignore SIGTERM (stuck where no handler runs); with "walkout" launch exits
# after a second without waiting for its ranks.
FAKE_LAUNCHER = """\
import os, signal, subprocess, sys, time
level, mode = int(sys.argv[1]), sys.argv[3]
if level < 2:  # runner (0) and launch (1) start the next level; launch starts two ranks
    kids = [subprocess.Popen([sys.executable, __file__, str(level + 1), *sys.argv[2:]]) for _ in range(1 + level)]
    if level == 1 and mode == "walkout":
        time.sleep(1.5)
        sys.exit(0)
    sys.exit(max(k.wait() for k in kids))
signal.signal(signal.SIGUSR1, lambda *_: sys.exit(75))
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(f"{sys.argv[2]}.{os.getpid()}", "w").close()  # ready
time.sleep(30)
sys.exit(1)
"""


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def rank_pids(tmp_path: Path) -> list[int]:
    return [int(p.name.split(".")[1]) for p in tmp_path.glob("rank.*")]


def signal_when_ranks_ready(tmp_path: Path, sig: int) -> None:
    def send() -> None:
        deadline = time.monotonic() + 20
        while len(rank_pids(tmp_path)) < 2:
            if time.monotonic() > deadline:
                return  # the ranks never got ready: they exit 1 after 30 s
            time.sleep(0.02)
        os.kill(os.getpid(), sig)  # as `kill -SIG <bigtx launch local>` would

    threading.Thread(target=send, daemon=True).start()


def fake_launch(tmp_path: Path, mode: str) -> list[str]:
    script = tmp_path / "fake_launcher.py"
    script.write_text(FAKE_LAUNCHER)
    return [sys.executable, str(script), "0", str(tmp_path / "rank"), mode]


def test_local_run_passes_usr1_to_the_ranks(tmp_path: Path) -> None:
    signal_when_ranks_ready(tmp_path, signal.SIGUSR1)
    assert local.run(fake_launch(tmp_path, "plain")) == EXIT_REQUEUE


def test_ranks_that_ignore_sigterm_are_killed_after_the_grace_period(tmp_path: Path) -> None:
    signal_when_ranks_ready(tmp_path, signal.SIGTERM)
    t0 = time.monotonic()
    code = local.run(fake_launch(tmp_path, "stubborn"), grace_s=0.5, margin_s=0.5)
    assert code != 0 and time.monotonic() - t0 < 15  # not the ranks' 30 s
    assert len(rank_pids(tmp_path)) == 2 and not any(alive(p) for p in rank_pids(tmp_path))


def test_ranks_the_launcher_leaves_behind_are_killed(tmp_path: Path) -> None:
    t0 = time.monotonic()
    assert local.run(fake_launch(tmp_path, "walkout")) == 0
    assert time.monotonic() - t0 < 15
    wait_until(lambda: len(rank_pids(tmp_path)) == 2, 5, "the ranks' ready files")
    assert not any(alive(p) for p in rank_pids(tmp_path))

"""`bigtx doctor` on synthetic run directories: healthy, finished, one rank frozen, one rank stuck in a phase
while the others wait, a straggler, missing ranks, and bad input (exit 2, one clear line)."""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path

import pytest

from bigtx.cli.main import main
from bigtx.doctor import diagnose
from bigtx.heartbeat import dump_stacks

NOW = 1_800_000_000.0


def beat(
    run: Path,
    rank: int,
    *,
    host: str = "",
    step: int = 7,
    phase: str = "forward",
    age: float = 0.5,
    since_age: float = 1.0,
    ended: str | None = None,
    world: int = 2,
) -> dict:
    record = {
        "rank": rank,
        "world_size": world,
        "host": host or f"node{rank}",
        "pid": 100 + rank,
        "step": step,
        "phase": phase,
        "since": NOW - since_age,
        "time": NOW - age,
        "median_step_s": 0.2,
        "ended": ended,
    }
    (run / "heartbeat").mkdir(parents=True, exist_ok=True)
    (run / "heartbeat" / f"rank{rank}.json").write_text(json.dumps(record))
    return record


def dump(run: Path, record: dict) -> Path:
    header = {k: record[k] for k in ("rank", "world_size", "host", "pid", "step", "phase", "since")}
    return dump_stacks(run / "hang", header)


def doctor(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["doctor", *args])
        except SystemExit as exc:
            code = exc.code
    return int(code or 0), out.getvalue(), err.getvalue()


def test_healthy_running_job(tmp_path: Path) -> None:
    beat(tmp_path, 0)
    beat(tmp_path, 1)
    report = diagnose(tmp_path, now=NOW)
    assert (report.status, report.exit_code, report.blamed) == ("running", 0, [])
    assert report.lines == ["running: 2 rank(s) at step 7, heartbeats current"]
    assert report.stuck_nodes() == []


def test_finished_run(tmp_path: Path) -> None:
    beat(tmp_path, 0, ended="exited", age=100)
    beat(tmp_path, 1, ended="exited", age=100)
    (tmp_path / "FINISHED").write_text("step 20\n")
    report = diagnose(tmp_path, now=NOW)
    assert (report.status, report.exit_code) == ("finished", 0)
    assert report.lines == ["the run finished (step 20)"]


def test_a_frozen_rank_is_named_with_its_host(tmp_path: Path) -> None:
    """The SIGSTOP case: rank 1's heartbeat stopped in its forward; rank 0 dumped its stacks waiting in the
    backward's all-reduce, then its collective timed out."""
    beat(tmp_path, 1, host="gpu-b", phase="forward", age=40, since_age=41)
    waiting = beat(
        tmp_path,
        0,
        host="gpu-a",
        phase="backward",
        age=20,
        since_age=39,
        ended="error: RuntimeError: Connection closed by peer",
    )
    dump(tmp_path, waiting)
    report = diagnose(tmp_path, now=NOW)
    assert (report.status, report.exit_code) == ("stuck", 1)
    assert [(b["rank"], b["host"], b["phase"], b["step"]) for b in report.blamed] == [(1, "gpu-b", "forward", 7)]
    assert report.lines[0].startswith("rank 1 on host gpu-b (pid 101) is stuck: its last heartbeat, at ")
    assert "(20 s before the last of its peers), found it in phase forward of step 7" in report.lines[0]
    assert "no stack dump" in report.lines[0]
    assert report.lines[1].startswith("rank 0 on host gpu-a (pid 100) waited in phase backward of step 7")
    assert report.lines[1].endswith("; it ended with error: RuntimeError: Connection closed by peer")
    assert len(report.lines) == 2  # no logs/ here
    code, out, _ = doctor(str(tmp_path), "--json")
    assert code == 1 and json.loads(out)["blamed"][0]["host"] == "gpu-b"
    assert doctor(str(tmp_path), "--stuck-nodes")[:2] == (1, "gpu-b\n")  # what the sbatch script excludes


def test_the_blamed_ranks_newest_log_is_named(tmp_path: Path) -> None:
    beat(tmp_path, 1, age=40)
    beat(tmp_path, 0, ended="error: timeout", age=20)
    (tmp_path / "logs").mkdir()
    for name in ("7.0-rank1-n2.log", "7.0-rank0-n1.log", "8.0-rank1-n3.log", "8.0-rank11-n3.log"):
        (tmp_path / "logs" / name).write_text("...")
        time.sleep(0.01)  # distinct modification times, newest last
    report = diagnose(tmp_path, now=NOW)
    assert report.lines[-1] == "rank 1's log: logs/8.0-rank1-n3.log"
    assert report.blamed[0]["log"] == "logs/8.0-rank1-n3.log"


def test_a_rank_that_was_stopped_and_continued_is_still_named(tmp_path: Path) -> None:
    """SLURM sends SIGCONT before it ends a step: the stopped rank runs again, finds its peer gone and
    fails. Its heartbeat thread recorded that the process did not run while its peer dumped."""
    stopped = beat(tmp_path, 1, host="gpu-b", phase="backward", age=1, ended="error: RuntimeError: peer gone")
    stopped["paused"] = {"from": NOW - 40, "to": NOW - 2, "step": 6, "phase": "forward"}
    (tmp_path / "heartbeat" / "rank1.json").write_text(json.dumps(stopped))
    dump(tmp_path, beat(tmp_path, 0, host="gpu-a", phase="backward", age=20, since_age=39, ended="error: timeout"))
    report = diagnose(tmp_path, now=NOW)
    assert (report.status, report.exit_code, report.stuck_nodes()) == ("stuck", 1, ["gpu-b"])
    assert report.lines[0].startswith("rank 1 on host gpu-b (pid 101) is stuck: its process did not run for 38 s")
    assert report.lines[0].endswith(
        "after its heartbeat found it in phase forward of step 6; it ended with error: RuntimeError: peer gone"
    )
    assert report.lines[1].startswith("rank 0 on host gpu-a (pid 100) waited in phase backward of step 7")


def test_a_pause_of_a_job_that_went_on_is_history(tmp_path: Path) -> None:
    record = beat(tmp_path, 0)
    record["paused"] = {"from": NOW - 400, "to": NOW - 300, "step": 1, "phase": "data"}
    (tmp_path / "heartbeat" / "rank0.json").write_text(json.dumps(record))
    beat(tmp_path, 1)
    assert diagnose(tmp_path, now=NOW).status == "running"


def test_while_the_job_runs_a_silent_rank_is_measured_against_now(tmp_path: Path) -> None:
    beat(tmp_path, 0, age=NOW - time.time())  # written just now
    beat(tmp_path, 1, age=NOW - time.time() + 30)
    report = diagnose(tmp_path)
    assert report.status == "stuck" and [b["rank"] for b in report.blamed] == [1]
    assert "s before now)" in report.lines[0]


def test_the_rank_furthest_behind_is_stuck_and_the_others_wait(tmp_path: Path) -> None:
    for rank, phase in [(0, "backward"), (1, "data"), (2, "backward")]:
        dump(tmp_path, beat(tmp_path, rank, phase=phase, world=3, since_age=400))
    report = diagnose(tmp_path, now=NOW)
    assert (report.status, report.exit_code) == ("stuck", 1)
    assert [(b["rank"], b["phase"]) for b in report.blamed] == [(1, "data")]
    assert report.lines[0].startswith("rank 1 on host node1 (pid 101) is stuck in phase data of step 7 since ")
    assert ", top of stack: " in report.lines[0] and " in dump_stacks (hang/rank1-step7-data-" in report.lines[0]
    assert [line.split(" (pid")[0] for line in report.lines[1:]] == ["rank 0 on host node0", "rank 2 on host node2"]
    assert {r["rank"]: r["state"] for r in report.ranks} == {0: "running", 1: "stuck", 2: "running"}


def test_a_dump_of_an_earlier_phase_is_history(tmp_path: Path) -> None:
    dump(tmp_path, beat(tmp_path, 0, phase="startup", step=0, since_age=500))
    beat(tmp_path, 0)  # it got going again
    beat(tmp_path, 1)
    assert (diagnose(tmp_path, now=NOW).status, diagnose(tmp_path, now=NOW).exit_code) == ("running", 0)


def test_a_straggler_is_behind(tmp_path: Path) -> None:
    beat(tmp_path, 0)
    beat(tmp_path, 1, host="slow-node")
    lines = [
        {
            "step": 10,
            "loss": 3.0,
            "slowest_rank": 0,
            "slowest_busy_s": 0.1,
            "median_busy_s": 0.1,
            "slowest_data_wait_s": 0.0,
        },
        {"step": 20, "val_loss": 3.0},
        {
            "step": 20,
            "loss": 2.9,
            "slowest_rank": 1,
            "slowest_busy_s": 0.45,
            "median_busy_s": 0.15,
            "slowest_data_wait_s": 0.31,
        },
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 2')
    report = diagnose(tmp_path, now=NOW)
    assert (report.status, report.exit_code) == ("behind", 1)
    assert [b["host"] for b in report.blamed] == ["slow-node"]
    assert report.stuck_nodes() == []  # slow, not stuck: no reason to leave the node
    assert report.lines == [
        "slowest rank at step 20: rank 1 on host slow-node, busy 0.450 s per step against a median of 0.150 s "
        "(data wait 0.310 s): behind"
    ]


def test_a_missing_rank_and_a_failed_rank(tmp_path: Path) -> None:
    beat(tmp_path, 0, world=3, ended="error: ValueError: boom", age=50)
    beat(tmp_path, 1, world=3, ended="exited", age=50)
    report = diagnose(tmp_path, now=NOW)
    assert (report.status, report.exit_code) == ("failed", 1)
    assert "rank 0 on host node0 (pid 100) was in phase forward of step 7" in report.lines[0]
    assert report.lines[1] == "rank 2 wrote no heartbeat (it never started, or its run directory is not shared)"


def test_ranks_beyond_the_newest_jobs_world_size_are_left_over(tmp_path: Path) -> None:
    beat(tmp_path, 0, world=1)
    beat(tmp_path, 3, world=4, age=5000)
    assert diagnose(tmp_path, now=NOW).status == "running"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda run: None, "no such run directory"),
        (lambda run: run.mkdir(), "no heartbeat files under heartbeat/"),
        (lambda run: (beat(run, 0), (run / "heartbeat" / "rank1.json").write_text("{trunc")), "rank1.json: not a "),
        (
            lambda run: (beat(run, 0), (run / "hang").mkdir(), (run / "hang" / "rank0-x.txt").write_text("junk")),
            "rank0-x.txt: not a bigtx hang dump",
        ),
    ],
)
def test_bad_input_is_exit_2_with_one_clear_line(tmp_path: Path, make, message: str) -> None:
    run = tmp_path / "run"
    make(run)
    code, out, err = doctor(str(run))
    assert code == 2 and out == ""
    assert err.startswith("bigtx: error: ") and message in err and "Traceback" not in err

"""``StopRequest``: a stop signal is a flag for the loop, with a deadline for ranks that never reach a step
boundary. Each case runs in its own interpreter (signal handlers are per process)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from bigtx.distributed import EXIT_STOP_TIMEOUT
from tests.harness import REPO, wait_until

# argv: grace, what to do after the signal ("spin", "read", "ack"), ready file
PROGRAM = """\
import os, subprocess, sys, time
from bigtx.distributed import StopRequest
stop = StopRequest(float(sys.argv[1]))
child = subprocess.Popen(["sleep", "300"])  # a child, like a `pipe:` shard command
open(sys.argv[3], "w").write(str(child.pid))
mode = sys.argv[2]
if mode == "spin":  # stuck in a Python loop that never looks at the flag
    while True:
        pass
if mode == "read":  # stuck in a blocking read
    r, w = os.pipe()
    os.read(r, 1)
while not stop.requested:  # "ack": reaches its step boundary
    time.sleep(0.01)
stop.acknowledge()
time.sleep(3 * float(sys.argv[1]))  # saving a checkpoint takes longer than the grace period
print("saved and left normally")
child.kill()
sys.exit(75)
"""


def start(tmp_path: Path, grace: float, mode: str) -> tuple[subprocess.Popen, int]:
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-c", PROGRAM, str(grace), mode, str(ready)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_until(lambda: proc.poll() is not None or (ready.exists() and ready.read_text() != ""), 60, "a start")
    assert proc.poll() is None, proc.communicate()[0]
    return proc, int(ready.read_text())


@pytest.mark.parametrize("mode", ["spin", "read"])
def test_a_stuck_process_leaves_after_the_grace_period_with_its_children(tmp_path: Path, mode: str) -> None:
    proc, child = start(tmp_path, 1.0, mode)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_STOP_TIMEOUT, out
    assert 0.9 < time.monotonic() - t0 < 10
    assert "SIGTERM received 1s ago and no step boundary reached" in out
    wait_until(lambda: not psutil.pid_exists(child) or psutil.Process(child).status() == "zombie", 10, "child")


def test_a_rank_that_reaches_its_step_boundary_is_not_cut_off(tmp_path: Path) -> None:
    proc, _ = start(tmp_path, 0.5, "ack")
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 75 and "saved and left normally" in out, out


def test_the_same_signal_twice_exits_at_once(tmp_path: Path) -> None:
    proc, _ = start(tmp_path, 60.0, "spin")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGINT and time.monotonic() - t0 < 10, out
    assert "second SIGINT: exiting now without a checkpoint" in out


def test_sigint_then_sigterm_still_means_checkpoint_and_stop(tmp_path: Path) -> None:
    """Ctrl-C reaches the ranks and DeepSpeed's launcher, which then sends SIGTERM: not a second signal."""
    proc, _ = start(tmp_path, 0.5, "ack")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 75, out


@pytest.mark.parametrize("value", ["abc", "0", "-3", "inf", "nan", ""])
def test_bad_grace_values_name_the_variable(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    from bigtx import lifetime

    monkeypatch.setenv("BIGTX_STOP_GRACE_S", value)
    with pytest.raises(ValueError, match="BIGTX_STOP_GRACE_S: .* is not a positive number of seconds"):
        lifetime.stop_grace()

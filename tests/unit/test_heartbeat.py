"""The heartbeat file, the hang watchdog's stack dumps, and the watchdog's spec fields."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from bigtx import heartbeat
from bigtx.config import SpecError, load_spec
from bigtx.heartbeat import Heartbeat, HeartbeatError, Limits, read_dump_header, read_heartbeat

LIMITS = Limits(factor=10.0, floor_s=0.2, cap_s=100.0)


def test_limits_take_the_larger_of_factor_and_floor_under_the_cap() -> None:
    assert LIMITS.seconds(None) == 0.2  # no step timed yet
    assert LIMITS.seconds(0.01) == 0.2
    assert LIMITS.seconds(0.5) == 5.0
    assert LIMITS.seconds(50.0) == 100.0


def test_the_heartbeat_file_says_step_phase_and_how_the_rank_ended(tmp_path: Path) -> None:
    with Heartbeat(tmp_path, 1, 2, "node7", LIMITS) as beat:
        first = read_heartbeat(tmp_path / "heartbeat" / "rank1.json")
        assert (first["rank"], first["world_size"], first["host"], first["pid"]) == (1, 2, "node7", os.getpid())
        assert (first["step"], first["phase"], first["ended"]) == (0, "startup", None)
        beat.step(1)
        beat.step(2)
        t = beat.mark("backward")
        assert abs(t - time.perf_counter()) < 1.0
    final = read_heartbeat(tmp_path / "heartbeat" / "rank1.json")
    assert (final["step"], final["phase"], final["ended"]) == (2, "backward", "exited")
    assert final["median_step_s"] is not None and final["since"] <= final["time"]
    assert not list((tmp_path / "heartbeat").glob("*.tmp"))


def test_an_exception_is_written_as_the_end(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), Heartbeat(tmp_path, 0, 1, "h", LIMITS):
        raise RuntimeError("gloo timed out")
    assert read_heartbeat(tmp_path / "heartbeat" / "rank0.json")["ended"] == "error: RuntimeError: gloo timed out"


def test_the_background_thread_rewrites_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heartbeat, "INTERVAL_S", 0.05)
    path = tmp_path / "heartbeat" / "rank0.json"
    with Heartbeat(tmp_path, 0, 1, "h", Limits(10.0, 100.0, 100.0)) as beat:
        beat.step(3)
        beat.mark("eval")
        deadline = time.monotonic() + 5
        while read_heartbeat(path)["phase"] != "eval":
            assert time.monotonic() < deadline, "the heartbeat thread did not write the new phase"
            time.sleep(0.02)
    assert read_heartbeat(path)["step"] == 3


class FirstWaitStalls(threading.Event):
    """The heartbeat thread's timer, whose first wait takes ``seconds``: as if the process had been stopped."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.stall: float | None = seconds

    def wait(self, timeout: float | None = None) -> bool:
        stall, self.stall = self.stall, None
        return super().wait(stall if stall is not None else timeout)


def test_a_process_that_did_not_run_says_so_when_it_runs_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heartbeat, "INTERVAL_S", 0.05)
    monkeypatch.setattr(heartbeat, "PAUSE_S", 0.3)
    path = tmp_path / "heartbeat" / "rank0.json"
    beat = Heartbeat(tmp_path, 0, 1, "h", Limits(10.0, 100.0, 100.0))
    beat.step(4)
    beat.mark("forward")
    beat._done = FirstWaitStalls(0.5)
    beat.start()  # writes step 4, forward: what the rank was doing when it "stopped"
    beat.mark("backward")
    deadline = time.monotonic() + 5
    while (paused := read_heartbeat(path).get("paused")) is None:
        assert time.monotonic() < deadline, "no pause recorded"
        time.sleep(0.02)
    beat.stop("exited")
    assert (paused["step"], paused["phase"]) == (4, "forward")
    assert 0.5 <= paused["to"] - paused["from"] < 1.5


def _fake_stuck_phase(seconds: float) -> None:
    time.sleep(seconds)  # the dump's "top" line points here


def test_a_phase_past_its_limit_dumps_every_stack_once(tmp_path: Path) -> None:
    beat = Heartbeat(tmp_path, 3, 4, "node9", LIMITS)
    beat.step(5)
    beat.mark("data")
    dumps: list[Path | None] = []
    checker = threading.Timer(0.4, lambda: dumps.extend([beat.check(), beat.check()]))
    checker.start()
    _fake_stuck_phase(0.8)
    checker.join()
    path, again = dumps
    assert again is None  # once per stalled phase
    assert path is not None and path.parent == tmp_path / "hang" and path.name.startswith("rank3-step5-data-")
    header = read_dump_header(path)
    assert (header["rank"], header["host"], header["step"], header["phase"]) == ("3", "node9", "5", "data")
    line = _fake_stuck_phase.__code__.co_firstlineno + 1
    assert header["top"] == f"{__file__}:{line} in _fake_stuck_phase"
    text = path.read_text()
    assert text.index("--- thread MainThread") < text.index("--- thread Thread")  # the checker's own thread
    assert "in test_a_phase_past_its_limit_dumps_every_stack_once" in text
    beat.mark("forward")  # a new phase may stall again
    assert beat.check() is None
    time.sleep(0.25)
    assert beat.check() is not None


def test_no_dump_within_the_limit(tmp_path: Path) -> None:
    beat = Heartbeat(tmp_path, 0, 1, "h", Limits(10.0, 60.0, 100.0))
    beat.mark("forward")
    assert beat.check() is None
    assert not (tmp_path / "hang").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "not a readable heartbeat file"),
        ('{"rank": 0, "world_size": 1, "ho', "not a readable heartbeat file"),
        ("[1, 2]", "not a heartbeat record"),
        (b"\xff\xfe\x00", "not a readable heartbeat file"),
        ('{"rank": "0"}', "field 'rank' is '0', expected int"),
        ('{"rank": true}', "field 'rank' is True, expected int"),
    ],
)
def test_corrupt_heartbeat_files_are_named(tmp_path: Path, content: str | bytes, message: str) -> None:
    path = tmp_path / "rank0.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(HeartbeatError, match=message) as info:
        read_heartbeat(path)
    assert str(path) in str(info.value)


def test_a_bad_pause_record_is_refused(tmp_path: Path) -> None:
    record = {"rank": 0, "world_size": 1, "host": "h", "pid": 1, "step": 0, "phase": "data", "since": 1, "time": 2}
    (tmp_path / "rank0.json").write_text(json.dumps({**record, "paused": {"from": 1, "to": "x"}}))
    with pytest.raises(HeartbeatError, match="field 'paused'"):
        read_heartbeat(tmp_path / "rank0.json")


def test_an_unknown_phase_is_refused(tmp_path: Path) -> None:
    record = {"rank": 0, "world_size": 1, "host": "h", "pid": 1, "step": 0, "phase": "dancing", "since": 1, "time": 2}
    (tmp_path / "rank0.json").write_text(json.dumps(record))
    with pytest.raises(HeartbeatError, match="unknown phase 'dancing'"):
        read_heartbeat(tmp_path / "rank0.json")


@pytest.mark.parametrize("content", ["", "hello\n", "rank: x\nstep: 1\nphase: data\ntop: a\n", "rank: 0\n--- thread"])
def test_a_file_that_is_no_hang_dump_is_named(tmp_path: Path, content: str) -> None:
    path = tmp_path / "rank0-x.txt"
    path.write_text(content)
    with pytest.raises(HeartbeatError, match="not a bigtx hang dump"):
        read_dump_header(path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("watchdog.factor=1", "watchdog.factor"),
        ("watchdog.factor=abc", "watchdog.factor"),
        ("watchdog.floor_s=0", "watchdog.floor_s"),
        ("watchdog.floor_s=inf", "watchdog.floor_s"),
        ("watchdog.patience=3", "watchdog.patience"),
    ],
)
def test_bad_watchdog_fields_are_named(override: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        load_spec("tiny", [override])
    assert any(message in line for line in info.value.errors), info.value.errors


def test_watchdog_defaults() -> None:
    spec = load_spec("tiny")
    assert (spec.watchdog.factor, spec.watchdog.floor_s) == (10.0, 300.0)

"""Reading metrics.jsonl while a run appends to it, after a kill, and when a line is broken."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bigtx.metrics import MetricsLogger, read_records, truncate_after


def write_lines(path: Path, steps: list[int], tail: str = "") -> None:
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps) + tail)


def test_a_line_still_being_written_is_left_out(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    write_lines(path, [1, 2], tail='{"step": 3, "loss": 0.3')
    assert [r["step"] for r in read_records(path)] == [1, 2]


def test_resume_drops_later_steps_and_a_line_cut_by_a_kill(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    write_lines(path, [1, 2, 3], tail='{"step": 4, "lo')
    truncate_after(path, 2)
    assert path.read_text() == "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in [1, 2])


@pytest.mark.parametrize("bad", ["not json", "[1, 2]", '{"loss": 1.0}', '{"step": "3"}'])
def test_a_broken_line_is_named(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1}) + "\n" + bad + "\n" + json.dumps({"step": 2}) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a metrics record .*delete or repair"):
        read_records(path)


def test_plot_of_a_broken_file_exits_with_the_line(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n\x00\x01garbage\n')
    proc = subprocess.run(
        [sys.executable, "-m", "bigtx", "plot", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "metrics.jsonl:2: not a metrics record" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_rewind_cuts_the_metrics_back_and_logs_on(tmp_path: Path) -> None:
    metrics = MetricsLogger(tmp_path, enabled=True)
    for step in range(1, 6):
        metrics.log({"step": step, "loss": 1.0 / step})
    metrics.cut_back(3)
    metrics.log({"step": 4, "loss": 9.0})
    metrics.close()
    assert [(r["step"], r["loss"]) for r in read_records(tmp_path / "metrics.jsonl")] == [
        (1, 1.0),
        (2, 0.5),
        (3, 1.0 / 3),
        (4, 9.0),
    ]
    MetricsLogger(tmp_path, enabled=False).cut_back(1)  # other ranks: nothing
    assert len(read_records(tmp_path / "metrics.jsonl")) == 4

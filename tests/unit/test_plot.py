"""`bigtx plot` renders a PNG from metrics.jsonl and refuses a directory without one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bigtx.cli.main import main
from bigtx.plot import read_metrics, val_lines


def fake_run(path: Path, scale: float) -> Path:
    path.mkdir()
    lines = [
        {"step": s, "loss": scale * 5 / s, "lr": 1e-3, "tokens_per_s": 1000.0, "grad_norm": 1.0 / s, "tokens": 512 * s}
        for s in range(1, 21)
    ]
    lines.append({"step": 20, "val_loss": scale * 0.3, "val_ppl": 1.3})
    path.joinpath("metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def test_plot_overlays_runs(tmp_path: Path) -> None:
    a, b = fake_run(tmp_path / "a", 1.0), fake_run(tmp_path / "b", 2.0)
    # a distillation run's lines carry the loss's two parts; KD starts at 0 on the log-scale panel
    records = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    distill = [r | {"ce_loss": r["loss"], "kd_loss": r["step"] - 1.0} if "loss" in r else r for r in records]
    (b / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in distill))
    out = tmp_path / "curves.png"
    assert main(["plot", str(a), str(b), "--out", str(out), "--x", "tokens"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_plot_without_metrics_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(["plot", str(tmp_path)])
    assert info.value.code == 2 and "no metrics.jsonl" in capsys.readouterr().err


def test_one_validation_line_per_named_source(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "named", 1.0)
    evals = [{"step": s, "val_loss": 2.0 / s, "val_loss/web": 1.5 / s, "val_loss/code": 2.5 / s} for s in (10, 20)]
    with (run / "metrics.jsonl").open("a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in evals))
    records = read_metrics(run)
    assert val_lines(records) == {
        "val": [(20, 0.3), (10, 0.2), (20, 0.1)],
        "val/code": [(10, 0.25), (20, 0.125)],
        "val/web": [(10, 0.15), (20, 0.075)],
    }
    assert val_lines(records, "tokens")["val/web"] == [(5120, 0.15), (10240, 0.075)]
    out = tmp_path / "named.png"
    assert main(["plot", str(run), "--out", str(out)]) == 0 and out.stat().st_size > 10_000

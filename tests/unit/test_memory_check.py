"""The plan's summary in `bigtx config show` and at the start of training, and the warning."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bigtx import memory_check, train
from bigtx.config import load_spec
from bigtx.config.memory_plan import Cluster, plan
from bigtx.distributed import DistEnv


def test_config_show_prints_the_summary_as_a_yaml_comment() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bigtx", "config", "show", "tiny", "--world-size", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert out.splitlines()[-1].startswith("# memory plan (1x2 ranks on the CPU, ZeRO-2, micro-batch 4): ")
    assert yaml.safe_load(out)["derived"]["world_size"] == 2  # still valid YAML


@pytest.mark.skipif(memory_check.torch.cuda.is_available(), reason="the CPU branch")
def test_on_the_cpu_the_host_holds_every_ranks_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = load_spec("tiny")
    result = plan(spec, Cluster(1, 2, 1, 1), suggest=False, device="cpu")
    needed = 2 * result.per_gpu.total + result.per_node_host.total
    monkeypatch.setattr(memory_check, "host_memory", lambda: needed)
    summary, warning = memory_check.memory_report(spec, 2, 2, None)
    assert warning is None and summary.endswith(": fits (no GPU to check)")
    monkeypatch.setattr(memory_check, "host_memory", lambda: needed - 1)
    summary, warning = memory_check.memory_report(spec, 2, 2, None)
    assert "does NOT fit" in summary
    assert warning is not None and "`bigtx plan SPEC --nodes 1 --gpus-per-node 2`" in warning


def test_training_warns_before_building(
    byte_shards: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = load_spec("tiny", [f"data.train={byte_shards}"])
    env = DistEnv(0, 1, 0, 1, "127.0.0.1", 0, "single")
    train.preflight(spec, env)
    out, err = capsys.readouterr()
    assert out.startswith("bigtx: memory plan (1x1 ranks") and err == ""
    monkeypatch.setattr(memory_check, "host_memory", lambda: 1)
    train.preflight(spec, env)
    out, err = capsys.readouterr()
    assert err.startswith("bigtx: warning: the memory plan says this run will not fit")
    train.preflight(spec, DistEnv(1, 2, 1, 2, "127.0.0.1", 0, "single"))  # rank 1 says nothing
    assert capsys.readouterr() == ("", "")

"""bf16 is chosen only where it is fast: a GPU, or a CPU with oneDNN's bf16 kernels."""

from __future__ import annotations

import pytest
import torch

from bigtx.cli.demo_cmd import demo_precision
from bigtx.distributed import fast_bf16


@pytest.fixture
def cpu(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def with_kernels(present: bool) -> None:
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: present)

    return with_kernels


def test_a_cpu_without_bf16_kernels_is_not_fast(cpu) -> None:
    cpu(False)
    assert fast_bf16() is False
    cpu(True)
    assert fast_bf16() is True


def test_a_gpu_is_fast_whatever_the_cpu(cpu, monkeypatch: pytest.MonkeyPatch) -> None:
    cpu(False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert fast_bf16() is True


def test_the_demo_trains_in_fp32_where_bf16_would_crawl(cpu, capsys: pytest.CaptureFixture[str]) -> None:
    cpu(False)
    assert demo_precision("auto") == "fp32"
    assert "no bf16 matrix kernels" in capsys.readouterr().out
    cpu(True)
    assert demo_precision("auto") == "bf16"


@pytest.mark.parametrize("choice", ["bf16", "fp16", "fp32"])
def test_an_explicit_demo_precision_is_kept(cpu, choice: str) -> None:
    cpu(False)
    assert demo_precision(choice) == choice

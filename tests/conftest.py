"""Fixtures shared by the multi-process tests: real shards built once per session."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import build_byte_shards, stray_processes


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """After the whole suite: no rank, launcher or loader worker that a test started is still running
    (an orphan holds memory and, on rank 0, the rendezvous port the next run needs)."""
    start = time.time()
    yield
    deadline = time.monotonic() + 10  # processes told to stop at the very end get a moment
    while (strays := stray_processes(start)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not strays, "processes left running by the test suite:\n" + "\n".join(strays)


@pytest.fixture(scope="session")
def byte_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards of real text (stdlib sources) with the built-in byte tokenizer, via `bigtx data build`."""
    return build_byte_shards(tmp_path_factory.mktemp("shards") / "byte")

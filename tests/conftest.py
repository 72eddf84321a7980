"""Fixtures shared by the multi-process tests: real shards built once per session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import REPO, base_env, corpus_files


@pytest.fixture(scope="session")
def byte_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards of real text (stdlib sources) with the built-in byte tokenizer, via `bigtx data build`."""
    out = tmp_path_factory.mktemp("shards") / "byte"
    cmd = [sys.executable, "-m", "bigtx", "data", "build", "--input", *map(str, corpus_files()),
           "--tokenizer", "byte", "--out", str(out), "--shard-size", "200KB", "--val-fraction", "0.1"]
    subprocess.run(cmd, check=True, env=base_env(), cwd=REPO, capture_output=True)
    return out


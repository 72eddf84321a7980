"""`bigtx train` with data.document_mask on 2 gloo ranks.

The documents are short (a few source lines each, several per 64-token row), so the mask changes the
numbers; a masked run that stops and resumes retraces the uninterrupted one bit for bit, its
evaluation (which masks too) included. The equivalence with documents run one by one is a unit test
(tests/unit/test_documents.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import REPO, base_env, corpus_files, metrics, tiny_overrides, train, train_records

pytestmark = pytest.mark.slow

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
COMMON = [
    "precision=fp32",
    "zero.stage=2",
    "train.log_every=1",
    "train.eval_every=2",
    "train.eval_batches=2",
    "checkpoint.every_steps=2",
    # a constant rate after one warm-up step: a run stopped at step 2 then extended to 4 trains as one of 4
    "schedule.warmup_steps=1",
    "schedule.decay=constant",
]


@pytest.fixture(scope="module")
def short_documents(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Byte-tokenized shards of documents of three source lines each (about 100 bytes)."""
    work = tmp_path_factory.mktemp("short_docs")
    lines = [line for path in corpus_files(12) for line in path.read_text().splitlines() if line.strip()]
    with open(work / "docs.jsonl", "w") as f:
        for i in range(0, len(lines) - 2, 3):
            f.write(json.dumps({"text": "\n".join(lines[i : i + 3])}) + "\n")
    out = work / "shards"
    cmd = [sys.executable, "-m", "bigtx", "data", "build", "--input", str(work / "docs.jsonl"), "--tokenizer", "byte"]
    cmd += ["--out", str(out), "--shard-size", "50KB", "--val-fraction", "0.1"]
    subprocess.run(cmd, check=True, env=base_env(), cwd=REPO, capture_output=True)
    return out


def _run(run_dir: Path, shards: Path, logs: Path, *extra: str) -> None:
    train("tiny", tiny_overrides(run_dir, shards, *COMMON, *extra), 2, logs, env=ONE_THREAD)


def test_masked_training_resumes_exactly_and_differs_from_unmasked(tmp_path: Path, short_documents: Path) -> None:
    straight, resumed, unmasked = tmp_path / "straight", tmp_path / "resumed", tmp_path / "unmasked"
    _run(straight, short_documents, tmp_path / "logs1", "data.document_mask=true", "train.max_steps=4")
    _run(resumed, short_documents, tmp_path / "logs2", "data.document_mask=true", "train.max_steps=2")
    _run(resumed, short_documents, tmp_path / "logs3", "data.document_mask=true", "train.max_steps=4")
    _run(unmasked, short_documents, tmp_path / "logs4", "train.max_steps=2", "train.eval_every=0")
    assert "resumed from" in (resumed / "train.log").read_text()

    a, b = train_records(straight), train_records(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert [a[s]["loss_step"] for s in a] == [b[s]["loss_step"] for s in a]
    evals = [[r["val_loss"] for r in metrics(run) if "val_loss" in r] for run in (straight, resumed)]
    assert len(evals[0]) == 2 and evals[0] == evals[1]
    # same weights, same batch at step 1: only the mask differs
    assert abs(a[1]["loss_step"] - train_records(unmasked)[1]["loss_step"]) > 1e-4

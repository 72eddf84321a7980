"""`bigtx launch slurm-data` on the real two-node cluster: a 2-task job array (one part per node), then
the merge after it; the shards are the single-process build's, byte for byte."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bigtx.data.build import build_shards
from tests.slurm.cluster import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

JOB_TIMEOUT = 240


def test_parts_on_two_nodes_then_merge(
    slurm_cluster: SlurmCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "in").mkdir()
    with open(tmp_path / "in" / "big.jsonl", "w") as f:
        for i in range(3000):
            f.write(json.dumps({"text": f"document {i} " + "lorem ipsum " * (i % 23)}) + "\n")
    (tmp_path / "in" / "note.txt").write_text("one more document")
    # 2 CPUs per task fill a node: the two parts run on the two nodes, side by side
    cmd = [sys.executable, "-m", "bigtx", "launch", "slurm-data", "--input", "in", "--tokenizer", "byte",
           "--out", "ds", "--parts", "2", "--cpus-per-task", "2", "--shard-size", "64KB"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=slurm_cluster.env())
    assert proc.returncode == 0, proc.stderr
    launch = tmp_path / "ds.parts" / "launch"
    array_id = slurm_cluster.sbatch(launch / "data-parts.sbatch")
    merge_id = slurm_cluster.sbatch(launch / "data-merge.sbatch", args=[f"--dependency=afterok:{array_id}"])
    logs = tmp_path / "ds.parts" / "logs"
    try:
        slurm_cluster.wait_for(merge_id, {"COMPLETED"}, JOB_TIMEOUT)
    except Exception as exc:
        text = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in sorted(logs.glob("*")))
        raise AssertionError(f"{exc}\n{text}") from None
    nodes = {p.read_text().split(" on ", 1)[1].split()[0] for p in logs.glob("part-*.out")}
    assert nodes == {"n1", "n2"}, nodes
    monkeypatch.chdir(tmp_path)  # the samples' sources name the inputs as given: "in/big.jsonl:17"
    build_shards(["in"], "byte", "single", shard_size=64000, progress=False)
    single = sorted(os.listdir(tmp_path / "single"))
    assert sorted(os.listdir(tmp_path / "ds")) == single and len(single) > 3
    for name in single:
        assert (tmp_path / "ds" / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name

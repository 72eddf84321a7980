"""`bigtx launch slurm-data`: the job-array and merge scripts, run here with bash as SLURM would run them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bigtx.cli.main import main
from bigtx.data.build import build_shards
from bigtx.launch.slurm_data import DataJobOptions, render_data_scripts, submit_data, write_data_launch

BASH = shutil.which("bash")
REPO = Path(__file__).resolve().parents[2]


def sbatch_lines(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]


@pytest.fixture
def corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    with open(tmp_path / "in" / "big.jsonl", "w") as f:
        for i in range(300):
            f.write(json.dumps({"text": f"document {i} " + "w" * (i % 40)}) + "\n")
    for i in range(3):
        (tmp_path / "in" / f"t{i}.txt").write_text(f"text {i} " * (i + 1))
    return tmp_path


def test_rendered_lines(tmp_path: Path, corpus: Path) -> None:
    opts = DataJobOptions(["in/*"], "byte", "ds", 4, cpus=3, max_running=2, partition="cpu", time="1:00:00",
                          sbatch_options=["--qos=low"], overwrite=True)  # fmt: skip
    parts, merge = render_data_scripts(opts, parts_dir=tmp_path / "p", out=tmp_path / "ds", workdir=tmp_path)
    assert sbatch_lines(parts) == [
        "--job-name=bigtx-data-parts", "--array=1-4%2", "--nodes=1", "--ntasks=1", "--cpus-per-task=3",
        "--partition=cpu", "--time=1:00:00", "--qos=low", f"--chdir={tmp_path}",
        f"--output={tmp_path}/p/logs/part-%a.%A.out", "--requeue",
    ]  # fmt: skip
    assert "-m bigtx data build --input 'in/*' --tokenizer byte --val-fraction 0.01 --text-field text " in parts
    assert f'--part "$PART/4" \\\n  --out {tmp_path}/p/part-"$PART" --overwrite --no-progress --workers 3\n' in parts
    assert sbatch_lines(merge)[:2] == ["--job-name=bigtx-data-merge", "--nodes=1"]
    assert f'data merge "${{part_dirs[@]}}" --out {tmp_path}/ds --overwrite\n' in merge
    for text in (parts, merge):
        assert "{{" not in text
        subprocess.run([BASH, "-n", "-c", text], check=True)


def test_the_scripts_build_what_one_build_writes(tmp_path: Path, corpus: Path, capsys) -> None:
    """Each array task and then the merge, run with bash in the job's directory: the merged shards are the
    single-process build's, byte for byte."""
    assert main(["launch", "slurm-data", "--input", "in/*", "--tokenizer", "byte", "--out", "ds", "--parts", "3",
                 "--shard-size", "4KiB", "--cpus-per-task", "1", "--python", sys.executable]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "submit: jid=$(sbatch --parsable" in out and "--dependency=afterok:$jid" in out
    launch = tmp_path / "ds.parts" / "launch"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for i in (1, 2, 3):
        res = subprocess.run([BASH, str(launch / "data-parts.sbatch")], env={**env, "SLURM_ARRAY_TASK_ID": str(i)},
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert res.returncode == 0, res.stderr
        assert f"part {i}/3: " in res.stdout
    res = subprocess.run([BASH, str(launch / "data-merge.sbatch")], env=env, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    build_shards(["in/*"], "byte", str(tmp_path / "single"), shard_size=4096, progress=False)
    for name in os.listdir(tmp_path / "single"):
        assert (tmp_path / "ds" / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name
    assert sorted(os.listdir(tmp_path / "ds")) == sorted(os.listdir(tmp_path / "single"))
    # outside an array the parts script says how to run it, instead of building part "/3"
    res = subprocess.run([BASH, str(launch / "data-parts.sbatch")], env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "run this script as a job array" in res.stderr


def test_submit_chains_the_merge_after_the_array(tmp_path: Path, corpus: Path) -> None:
    sbatch = tmp_path / "sbatch"
    answer = '[[ "$*" == *data-merge.sbatch ]] && echo 8 || echo "7;c1"'  # job ids, one with a cluster name
    sbatch.write_text(f'#!/bin/bash\necho "$*" >> {tmp_path}/calls\n{answer}\n')
    sbatch.chmod(0o755)
    files = write_data_launch(DataJobOptions(["in"], "byte", "ds", 2))
    assert submit_data(files, str(sbatch)) == (7, 8)
    assert (tmp_path / "calls").read_text().splitlines() == [
        f"--parsable {files.parts_script}",
        f"--parsable --dependency=afterok:7 {files.merge_script}",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--parts", "0"], "--parts: must be at least 1"),
        (["--input", "nothing*"], "matches no files"),
        (["--tokenizer", "missing.json"], "missing.json"),
        (["--shard-size", "1KB"], "--shard-size"),
        (["--val-fraction", "1"], "--val-fraction"),
        (["--cpus-per-task", "0"], "--cpus-per-task"),
        (["--max-running", "0"], "--max-running"),
        (["--time", "soon"], "--time"),
        (["--sbatch-option", "qos=x"], "--sbatch-option"),
        (["--out", "my data"], "white space"),
    ],
)
def test_errors_exit_2_and_write_nothing(tmp_path: Path, corpus: Path, capsys, args: list[str], message: str) -> None:
    base = {"--input": "in", "--tokenizer": "byte", "--out": "ds", "--parts": "2"}
    flags = dict(zip(args[::2], args[1::2]))
    argv = [x for k, v in {**base, **flags}.items() for x in (k, v)]
    with pytest.raises(SystemExit) as exc:
        main(["launch", "slurm-data", *argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["in"]

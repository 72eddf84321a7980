"""`bigtx plan`: the table, the JSON and every bad input."""

from __future__ import annotations

import json

import pytest

from bigtx.cli.main import main
from bigtx.config import load_spec
from bigtx.config.memory_plan import Cluster, plan

GB = 10**9


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        code = main(["plan", *args])
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_json_holds_the_planned_bytes(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "llama-70b", "--nodes", "8", "--gpus-per-node", "8", "--gpu-memory", "80GB", "--json")
    assert code == 0
    data = json.loads(out)
    expected = plan(load_spec("llama-70b"), Cluster(8, 8, 80 * GB, 10**12))
    assert data["per_gpu"] == expected.to_dict()["per_gpu"]
    assert set(data["per_gpu"]) == {"params", "grads", "optimizer", "activations", "buffers", "total"}
    assert set(data["per_node_host"]) == {"params", "grads", "optimizer", "activations", "buffers", "build", "total"}
    assert data["fits"] is True and data["suggestions"] == []
    assert data["per_gpu"]["total"] == 30_400_688_640


def test_the_table_and_suggestions(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "llama-70b", "--nodes", "1", "--gpus-per-node", "8")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("llama-70b on 1 node(s) x 8 GPUs (8 ranks): bf16, ZeRO-3")
    assert any(line.split()[:1] == ["activations"] for line in lines)
    assert "fits: no" in lines
    how = "--nodes 3 --set train.micro_batch_size=1 --set train.grad_accum=43 --set train.global_batch_size=1032"
    assert f"     {how}" in lines


def test_the_bucket_sizes_of_a_base_file_count(capsys: pytest.CaptureFixture[str]) -> None:
    args = ("llama-7b", "--nodes", "1", "--gpus-per-node", "8", "--json")
    default = json.loads(run(capsys, *args)[1])["per_gpu"]["buffers"]
    zero3 = json.loads(run(capsys, *args, "--set", "deepspeed.base=zero3")[1])["per_gpu"]["buffers"]
    # bigtx's ZeRO-3 gradient bucket (25M elements) unless the base file sets one
    assert (default, zero3) == (2 * (2 * 25_000_000 + 50_000_000), 2 * (2 * 50_000_000 + 50_000_000))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nodes", "0", "--gpus-per-node", "8"], "--nodes: must be at least 1, got 0"),
        (["--nodes", "1", "--gpus-per-node", "-2"], "--gpus-per-node: must be at least 1, got -2"),
        (["--nodes", "1", "--gpus-per-node", "8", "--gpu-memory", "80XB"], "--gpu-memory: cannot read '80XB'"),
        (["--nodes", "1", "--gpus-per-node", "8", "--host-memory=-1TB"], "--host-memory: cannot read '-1TB'"),
        (["--nodes", "1", "--gpus-per-node", "8", "--gpu-memory", "0"], "--gpu-memory: must be more than 0 bytes"),
        (["--nodes", "many", "--gpus-per-node", "8"], "argument --nodes: invalid int value: 'many'"),
        (["--nodes", "3", "--gpus-per-node", "1"], "train.global_batch_size: 1024 is not divisible"),
        (["--gpus-per-node", "8"], "the following arguments are required: --nodes"),
    ],
)
def test_bad_inputs_exit_2_with_a_clear_message(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, out, err = run(capsys, "llama-7b", *args)
    assert code == 2 and out == ""
    assert message in err and "Traceback" not in err


def test_a_missing_spec_exits_2(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    code, _, err = run(capsys, str(tmp_path / "missing.yaml"), "--nodes", "1", "--gpus-per-node", "1")
    assert code == 2 and "missing.yaml: no such file" in err


def test_a_distill_teacher_gets_its_own_row_and_a_bad_one_exits_2(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    from tests.unit.test_distill import TEACHER, export_teacher, reference

    teacher = export_teacher(reference(TEACHER), tmp_path)
    args = ["tiny", "--nodes", "1", "--gpus-per-node", "2", "--set", f"distill.teacher={teacher}"]
    code, out, _ = run(capsys, *args)
    rows = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert code == 0 and "teacher" in rows
    code, out, _ = run(capsys, *args[:5])
    assert code == 0 and "teacher" not in {line.split()[0] for line in out.splitlines() if line.strip()}
    code, _, err = run(capsys, *args[:6], f"distill.teacher={tmp_path}")
    assert code == 2 and f"distill.teacher: {tmp_path}: not a bigtx run directory" in err

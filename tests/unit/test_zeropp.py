"""ZeRO++ fields (zero.hpz_partition_size, zero.quantized_weights, zero.quantized_gradients): spec rules,
the layout check, the derived DeepSpeed keys, and the exit-2 messages of `bigtx train` and `bigtx launch`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bigtx.cli.main import main
from bigtx.config import SpecError, load_spec
from bigtx.config.deepspeed_config import derive_deepspeed_config
from bigtx.config.layout import check_layout
from bigtx.distributed import detect

REPO = Path(__file__).resolve().parents[2]
ZERO3 = ["zero.stage=3", "precision=fp32"]


@pytest.mark.parametrize("field", ["hpz_partition_size=2", "quantized_weights=true", "quantized_gradients=true"])
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_zeropp_needs_stage_3(field: str, stage: int) -> None:
    with pytest.raises(SpecError) as info:
        load_spec("tiny", [f"zero.stage={stage}", f"zero.{field}"])
    name = field.split("=")[0]
    assert info.value.errors == [
        f"zero.{name}: ZeRO++ needs zero.stage=3 (got {stage}); set zero.stage=3 or turn it off"
    ]


def test_hpz_partition_size_is_at_least_1() -> None:
    with pytest.raises(SpecError, match=r"zero\.hpz_partition_size: Input should be greater than or equal to 1"):
        load_spec("tiny", [*ZERO3, "zero.hpz_partition_size=0"])
    assert load_spec("tiny", ["zero.stage=2", "zero.hpz_partition_size=1"]).zero.hpz_partition_size == 1


def zero(*overrides: str):
    return load_spec("tiny", [*ZERO3, *overrides]).zero


def test_layout_hpz_must_divide_the_world_and_equal_the_ranks_per_node() -> None:
    check_layout(zero("zero.hpz_partition_size=2"), world_size=4, ranks_per_node=2, cuda_available=False)
    check_layout(zero("zero.hpz_partition_size=8"), world_size=64, ranks_per_node=8, cuda_available=True)
    check_layout(zero(), world_size=3, ranks_per_node=3, cuda_available=False)  # off: any layout
    with pytest.raises(ValueError) as info:
        check_layout(zero("zero.hpz_partition_size=4"), world_size=6, ranks_per_node=2, cuda_available=True)
    assert str(info.value) == (
        "zero.hpz_partition_size: 4 does not divide the world size 6; set it to the ranks per node (2) or to 1 (off)"
    )
    with pytest.raises(ValueError) as info:
        check_layout(zero("zero.hpz_partition_size=2"), world_size=8, ranks_per_node=4, cuda_available=True)
    assert str(info.value).startswith(
        "zero.hpz_partition_size: 2 is not the number of ranks (GPUs) per node (4); set it to 4 "
    )
    # one node holding the whole world: the secondary copy is the primary one, still inside the node
    check_layout(zero("zero.hpz_partition_size=2"), world_size=2, ranks_per_node=2, cuda_available=False)


@pytest.mark.parametrize("name", ["quantized_weights", "quantized_gradients"])
def test_layout_refuses_quantization_without_cuda(name: str) -> None:
    check_layout(zero(f"zero.{name}=true"), world_size=2, ranks_per_node=2, cuda_available=True)
    with pytest.raises(ValueError) as info:
        check_layout(zero(f"zero.{name}=true"), world_size=2, ranks_per_node=2, cuda_available=False)
    assert str(info.value) == (
        f"zero.{name}: ZeRO++ quantization runs on CUDA kernels only and this job has no GPU; set zero.{name}=false"
    )


def test_derived_keys_are_deepspeeds_own() -> None:
    """DeepSpeed's zero config forbids unknown keys: a misspelt key name fails here."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    on = load_spec(
        "tiny",
        [*ZERO3, "zero.hpz_partition_size=2", "zero.quantized_weights=true", "zero.quantized_gradients=true"],
    )
    block = derive_deepspeed_config(on, 4)["zero_optimization"]
    assert {k: block[k] for k in block if k.startswith("zero_")} == {
        "zero_hpz_partition_size": 2,
        "zero_quantized_weights": True,
        "zero_quantized_gradients": True,
    }
    parsed = DeepSpeedZeroConfig(**block)
    assert (parsed.zero_hpz_partition_size, parsed.zero_quantized_weights, parsed.zero_quantized_gradients) == (
        2,
        True,
        True,
    )
    off = derive_deepspeed_config(load_spec("tiny", ZERO3), 4)["zero_optimization"]
    assert not [k for k in off if k.startswith("zero_")]  # unchanged when off
    DeepSpeedZeroConfig(**off)
    with pytest.raises(ValueError, match="zero_hpz_partiton_size"):
        DeepSpeedZeroConfig(**off, zero_hpz_partiton_size=2)  # the check itself catches a wrong name


def test_a_base_file_cannot_switch_zeropp_on(tmp_path: Path) -> None:
    sneaky = tmp_path / "hpz.json"
    sneaky.write_text(json.dumps({"zero_optimization": {"zero_hpz_partition_size": 2, "zero_quantized_weights": True}}))
    with pytest.raises(ValueError) as info:
        derive_deepspeed_config(load_spec("tiny", [*ZERO3, f"deepspeed.base={sneaky}"]), 2)
    assert str(info.value).startswith(
        f"deepspeed.base: {sneaky} sets zero_hpz_partition_size, zero_quantized_weights; delete them from the base file"
    )


def train_rank(env: dict[str, str], *overrides: str) -> subprocess.CompletedProcess:
    """`bigtx train tiny` as one rank of the world ``env`` describes (no other rank exists: it must
    stop in the preflight, before any process group)."""
    sets = [a for o in (*ZERO3, "data.train=nowhere", *overrides) for a in ("--set", o)]
    return subprocess.run(
        [sys.executable, "-m", "bigtx", "train", "tiny", *sets],
        env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_ranks_per_node_from_every_launcher() -> None:
    world = {"RANK": "3", "WORLD_SIZE": "16", "LOCAL_RANK": "3"}
    assert detect({**world, "LOCAL_WORLD_SIZE": "8"}).local_world_size == 8  # torchrun
    assert detect({**world, "LOCAL_SIZE": "8"}).local_world_size == 8  # DeepSpeed's launcher
    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "16", "SLURM_STEP_ID": "0", "MASTER_ADDR": "n1"}
    assert detect({**slurm, "SLURM_NTASKS_PER_NODE": "8(x2)"}).local_world_size == 8


def test_train_preflight_checks_the_layout(tmp_path: Path) -> None:
    world = {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}
    res = train_rank(world, f"run.dir={tmp_path / 'run'}", "zero.hpz_partition_size=4")
    assert res.returncode == 2, res.stderr
    assert "zero.hpz_partition_size: 4 is not the number of ranks (GPUs) per node (2); set it to 2" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "run").exists()
    res = train_rank(world, f"run.dir={tmp_path / 'run'}", "zero.quantized_gradients=true")
    assert res.returncode == 2 and "zero.quantized_gradients: ZeRO++ quantization runs on CUDA" in res.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nodes", "2", "--gpus-per-node", "2", "--no-gres", "--set", "zero.hpz_partition_size=4"],
         "zero.hpz_partition_size: 4 is not the number of ranks (GPUs) per node (2); set it to 2"),
        (["--nodes", "3", "--gpus-per-node", "1", "--no-gres", "--set", "zero.hpz_partition_size=2"],
         "zero.hpz_partition_size: 2 does not divide the world size 3"),
        (["--nodes", "2", "--no-gres", "--set", "zero.quantized_weights=true"],
         "zero.quantized_weights: ZeRO++ quantization runs on CUDA kernels only"),
    ],
)  # fmt: skip
def test_launch_slurm_checks_the_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, args, message) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["launch", "slurm", "tiny", *args, *(a for o in ZERO3 for a in ("--set", o))])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_launch_slurm_with_gpus_accepts_quantization(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The login node may have no GPU; a job that requests them (--gres) can quantize."""
    monkeypatch.chdir(tmp_path)
    sets = [a for o in (*ZERO3, "zero.quantized_weights=true", "zero.hpz_partition_size=8") for a in ("--set", o)]
    assert main(["launch", "slurm", "tiny", "--nodes", "2", "--gpus-per-node", "8", *sets]) == 0


def test_launch_local_checks_the_layout(capsys) -> None:
    sets = [a for o in (*ZERO3, "zero.hpz_partition_size=4") for a in ("--set", o)]
    with pytest.raises(SystemExit) as exc:
        main(["launch", "local", "tiny", "--nproc", "2", "--dry-run", *sets])
    assert exc.value.code == 2
    assert "zero.hpz_partition_size: 4 does not divide the world size 2" in capsys.readouterr().err
    sets = [a for o in (*ZERO3, "zero.hpz_partition_size=2") for a in ("--set", o)]
    assert main(["launch", "local", "tiny", "--nproc", "2", "--dry-run", *sets]) == 0

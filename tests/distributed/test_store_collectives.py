"""The checkpoint store's collectives on 2 real gloo ranks (``tests.harness.run_ranks``), with a stand-in
for DeepSpeed's engine: commit marker over every rank's files, verification split across ranks, the
resume decision and its refusals taken alike on every rank."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import xxhash

from bigtx.checkpoint import CheckpointError, verify
from bigtx.checkpoint.resume import _on_rank0, find_resume_point, plan_resume
from bigtx.checkpoint.saver import Saver
from bigtx.checkpoint.store import COMPLETE, META, NEWEST, load_rank_state
from bigtx.config import load_spec, spec_to_dict
from tests.harness import run_ranks


class FakeEngine:
    """Saves what DeepSpeed's ``save_checkpoint`` would, through its ``checkpoint_engine`` as DeepSpeed does:
    one file per rank, its bytes depending on the rank."""

    checkpoint_engine: Any = None

    def save_checkpoint(self, root: str, tag: str, save_latest: bool) -> None:
        rank = dist.get_rank()
        (Path(root) / tag).mkdir(parents=True, exist_ok=True)
        state = {"rank": rank, "optimizer": torch.full((1000 + rank,), rank, dtype=torch.uint8)}
        self.checkpoint_engine.save(state, str(Path(root) / tag / f"zero_pp_rank_{rank}_optim_states.pt"))


def save(ckpt_root: Path, step: int, rank_state: dict, meta: dict) -> Path:
    """A synchronous bigtx save, as the trainer makes it."""
    saver = Saver(FakeEngine(), ckpt_root, background=False, keep_last=3, keep_every=0, commit_timeout_s=60)
    return saver.save(step, rank_state, meta)


def same_on_every_rank(value: object) -> list:
    values: list = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    assert all(v == values[0] for v in values), values
    return values


def meta_for(step: int, spec: dict) -> dict:
    return {"step": step, "tokens": step * 10, "world_size": dist.get_world_size(), "zero_stage": 2, "spec": spec}


def _save_and_verify(rank: int, world: int, root: str) -> None:
    ckpt_root = Path(root) / "checkpoints"
    spec = spec_to_dict(load_spec("tiny"))
    path = save(ckpt_root, 20, {"rank": rank, "loader": {"pos": [rank, 7]}}, meta_for(20, spec))
    same_on_every_rank(str(path))
    recorded = json.loads((path / COMPLETE).read_text())["files"]
    expected = {f"zero_pp_rank_{r}_optim_states.pt" for r in range(world)} | {META}
    expected |= {f"bigtx_rank{r:05d}.pt" for r in range(world)}
    assert set(recorded) == expected  # every rank's files, hashed by whichever rank got them
    for name, entry in recorded.items():
        data = (path / name).read_bytes()
        assert entry == {"bytes": len(data), "xxh3_128": xxhash.xxh3_128(data).hexdigest()}
    assert (ckpt_root / NEWEST).read_text() == "step_00000020\n"
    assert load_rank_state(path, rank)["loader"] == {"pos": [rank, 7]}
    assert verify(path) == []

    dist.barrier()
    if rank == 0:  # damage the file that rank 1 hashes when verification is shared out
        victim = path / sorted(recorded)[1]
        victim.write_bytes(b"x" + victim.read_bytes()[1:])
    dist.barrier()
    problems = same_on_every_rank(verify(path))[0]
    assert len(problems) == 1 and "xxh3_128 differs" in problems[0] and sorted(recorded)[1] in problems[0]


def _resume_falls_back_alike(rank: int, world: int, root: str) -> None:
    ckpt_root = Path(root) / "checkpoints"
    spec = spec_to_dict(load_spec("tiny"))
    for step in (10, 20):
        save(ckpt_root, step, {"rank": rank}, meta_for(step, spec))
    dist.barrier()
    if rank == 0:
        victim = ckpt_root / "step_00000020" / "zero_pp_rank_1_optim_states.pt"
        victim.write_bytes(victim.read_bytes()[:-1])  # truncated
        (ckpt_root / "step_00000030").mkdir()  # a save that never committed
    dist.barrier()
    chosen = find_resume_point(ckpt_root, "auto", rank == 0)
    assert same_on_every_rank(chosen.name if chosen else None)[0] == "step_00000010"
    assert not (ckpt_root / "step_00000030").exists()

    changed = spec_to_dict(load_spec("tiny", ["model.d_ff=128"]))
    with pytest.raises(CheckpointError, match=r"model.d_ff: 176 -> 128"):
        plan_resume(Path(root), changed, world_size=world, total_steps=30, is_main=rank == 0)
    dist.barrier()  # every rank refused, none is left waiting in a collective

    if rank == 0:  # now the last intact one is damaged too: no fresh start over damaged checkpoints
        victim = ckpt_root / "step_00000010" / "zero_pp_rank_0_optim_states.pt"
        victim.write_bytes(b"x" + victim.read_bytes()[1:])
    dist.barrier()
    with pytest.raises(
        CheckpointError, match=r"every checkpoint in .* is damaged:\n  .*step_00000020.*\n  .*step_00000010"
    ):
        find_resume_point(ckpt_root, "auto", rank == 0)
    dist.barrier()


def _rank0_errors_reach_every_rank(rank: int, world: int) -> None:
    def fail() -> None:
        raise CheckpointError("converter failed on rank 0")

    with pytest.raises(CheckpointError, match="converter failed on rank 0"):
        _on_rank0(fail, rank == 0)
    _on_rank0(lambda: None, rank == 0)  # and a success raises nowhere


@pytest.mark.slow
def test_save_commits_every_rank_and_verify_is_shared(tmp_path: Path) -> None:
    run_ranks(_save_and_verify, 2, str(tmp_path))


@pytest.mark.slow
def test_resume_decisions_are_taken_alike_on_every_rank(tmp_path: Path) -> None:
    run_ranks(_resume_falls_back_alike, 2, str(tmp_path))


@pytest.mark.slow
def test_an_error_on_rank0_reaches_every_rank() -> None:
    run_ranks(_rank0_errors_reach_every_rank, 2)


def _rank1_fails(rank: int, world: int) -> None:
    assert rank != 1, "rank 1 was told to fail"


@pytest.mark.slow
def test_the_helper_reports_a_failing_rank() -> None:
    with pytest.raises(Exception, match="rank 1 was told to fail"):
        run_ranks(_rank1_fails, 2)


def _every_group_has_the_timeout(rank: int, world: int) -> None:
    import os
    from datetime import timedelta

    import deepspeed
    import torch
    import torch.distributed.distributed_c10d as c10d

    from bigtx import distributed

    os.environ["BIGTX_DIST_TIMEOUT_S"] = "37"
    distributed.init(distributed.detect())
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    adamw = {"type": "AdamW", "params": {"torch_adam": True}}
    config = {"train_batch_size": 2, "zero_optimization": {"stage": 3}, "optimizer": adamw}
    deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)  # DeepSpeed's own groups
    dist.new_group([0, 1])
    groups = list(c10d._world.pg_map)
    assert len(groups) >= 2
    for group in groups:
        assert group._get_backend(torch.device("cpu")).options._timeout == timedelta(seconds=37)
    # what new NCCL groups would get (this CPU build of torch has no NCCL to make one with; there the
    # variable is None until bigtx sets it, and torch falls back to the gloo default)
    assert c10d.default_pg_nccl_timeout == timedelta(seconds=37)
    assert c10d._get_default_timeout(c10d.Backend.NCCL) == timedelta(seconds=37)


@pytest.mark.slow
def test_the_collective_timeout_reaches_every_group() -> None:
    run_ranks(_every_group_has_the_timeout, 2, init=False)

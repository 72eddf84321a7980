"""Named validation sources (``data.val: [{name, path}, ...]``) on 2 gloo ranks: ``evaluate``'s
collectives with a stand-in engine, then real runs whose ``val_loss/<name>`` must equal the ``val_loss``
of a run given only that source."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from tests.harness import metrics, run_ranks, tiny_overrides, train

pytestmark = pytest.mark.slow


class ListLoader:
    """A val loader's interface over fixed micro-batches whose loss (``FakeEngine``) is ``value``."""

    def __init__(self, values: list[float]) -> None:
        self.batches = [(torch.full((1, 2), v), torch.zeros(1, 2)) for v in values]

    def __iter__(self):
        return iter(self.batches)

    def close(self) -> None:
        pass


class FakeEngine:
    """Loss = mean of the input; counts forward passes (ZeRO-3 needs the same count on every rank)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor, documents: None = None) -> torch.Tensor:
        self.calls += 1
        return x.mean()

    def eval(self) -> None:
        pass

    def train(self) -> None:
        pass


class Recorder:
    def __init__(self) -> None:
        self.records: list[dict] = []

    def log(self, record: dict) -> None:
        self.records.append(record)


def _evaluate_named_sets(rank: int, world_size: int) -> None:
    from bigtx.train import evaluate, log_eval

    # per rank: web has 4 and 2 batches (3 asked: 2 in common), code 1 and 2 (1 in common), and
    # sparse none on rank 1 -- left out on both ranks, instead of rank 0 waiting in a forward pass
    values = {
        "web": [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0]],
        "code": [[10.0], [20.0, 30.0]],
        "sparse": [[7.0], []],
    }
    engine = FakeEngine()
    job = SimpleNamespace(
        spec=SimpleNamespace(train=SimpleNamespace(eval_batches=3)),
        val_loaders={name: ListLoader(v[rank]) for name, v in values.items()},
        engine=engine,
        device=torch.device("cpu"),
        documents=lambda x: None,  # no data.document_mask
    )
    losses = evaluate(job)
    # web (1+2+5+6)/4, code (10+20)/2; val_loss weighs by batches (= tokens): (14+30)/(4+2)
    assert losses == {"web": 3.5, "code": 15.0, None: 44.0 / 6.0}, losses
    assert engine.calls == 3
    job.val_loaders = {"sparse": ListLoader(values["sparse"][rank])}
    assert evaluate(job) == {}
    job.val_loaders = {}
    assert evaluate(job) == {}
    if rank == 0:
        out = Recorder()
        log_eval(out, 7, {"web": 3.5, None: 2.0})
        log_eval(out, 8, {})
        assert [list(r) for r in out.records] == [["step", "val_loss", "val_ppl", "val_loss/web", "val_ppl/web"]]
    dist.barrier()


def test_evaluate_named_sets_on_two_ranks() -> None:
    run_ranks(_evaluate_named_sets, 2, timeout=60)


def test_each_named_val_loss_is_that_source_alone(tmp_path: Path, byte_shards: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    seen = str(byte_shards / "train-000000.tar")  # a training shard, read as it is: another "domain"
    common = [
        "train.max_steps=2",
        "schedule.warmup_steps=1",
        "precision=fp32",
        "train.eval_batches=2",
        "checkpoint.save_at_end=false",
    ]
    vals = {
        "named": f"data.val=[{{name: held-out, path: {byte_shards}}}, {{name: seen, path: {seen}}}]",
        "held-out": f"data.val={byte_shards}",
        "seen": f"data.val={seen}",
    }
    finals = {}
    for run, val in vals.items():
        train("tiny", tiny_overrides(tmp_path / run, byte_shards, *common, val), 2, tmp_path / "logs", timeout=120)
        finals[run] = [r for r in metrics(tmp_path / run) if "val_loss" in r][-1]
    named = finals["named"]
    assert set(named) == {
        "step",
        "val_loss",
        "val_ppl",
        "val_loss/held-out",
        "val_ppl/held-out",
        "val_loss/seen",
        "val_ppl/seen",
    }
    assert named["val_loss/held-out"] == finals["held-out"]["val_loss"]
    assert named["val_loss/seen"] == finals["seen"]["val_loss"]
    assert named["val_loss/held-out"] != named["val_loss/seen"]
    # both sources ran eval_batches x 2 ranks micro-batches, so the token-weighted mean is the plain mean
    assert named["val_loss"] == pytest.approx((named["val_loss/held-out"] + named["val_loss/seen"]) / 2, rel=1e-12)
    events = EventAccumulator(str(tmp_path / "named" / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"val/val_loss", "val/val_loss/held-out", "val/val_loss/seen", "val/val_ppl/seen"} <= tags

"""Parameter groups and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest
from torch import nn

from bigtx.config.spec import OptimSection, ScheduleSection
from bigtx.optim import lr_at, param_groups


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4, bias=True)
        self.norm = nn.LayerNorm(4)


def test_weight_decay_on_matrices_only() -> None:
    groups = {g["name"]: g for g in param_groups(Toy(), OptimSection(weight_decay=0.1))}
    assert [p.shape for p in groups["decay"]["params"]] == [(4, 4)]
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert len(groups["no_decay"]["params"]) == 4  # embedding, bias, norm weight, norm bias
    with_embed = {g["name"]: g for g in param_groups(Toy(), OptimSection(decay_embeddings=True))}
    assert len(with_embed["decay"]["params"]) == 2


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant", "wsd"])
def test_schedule_shape(decay: str) -> None:
    optim = OptimSection(lr=1.0, min_lr=0.1)
    sched = ScheduleSection(warmup_steps=10, decay=decay, decay_fraction=0.2)
    lrs = [lr_at(s, 110, optim, sched) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert max(lrs) == pytest.approx(1.0)
    end = lr_at(110, 110, optim, sched)
    assert end == pytest.approx(1.0 if decay == "constant" else 0.1)
    if decay == "cosine":
        assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    if decay == "wsd":
        assert lrs[85] == pytest.approx(1.0) and lrs[100] < 1.0


def test_schedule_values_at_known_steps() -> None:
    """Exact values, so that a resumed run (which calls lr_at at its own steps) follows the same curve."""
    optim, sched = OptimSection(lr=1e-3, min_lr=1e-4), ScheduleSection(warmup_steps=5)
    assert lr_at(0, 50, optim, sched) == pytest.approx(2e-4, rel=1e-12)
    assert lr_at(4, 50, optim, sched) == pytest.approx(1e-3, rel=1e-12)
    # cosine: 1e-4 + 9e-4 * 0.5 * (1 + cos(pi * 15 / 45))
    assert lr_at(20, 50, optim, sched) == pytest.approx(7.75e-4, rel=1e-12)
    assert lr_at(50, 50, optim, sched) == pytest.approx(1e-4, rel=1e-12)


def test_weight_decay_groups_use_the_full_shape_of_partitioned_parameters() -> None:
    from bigtx import zero3

    toy = Toy()
    for p in toy.parameters():  # what a ZeRO-3 partitioned parameter looks like: an empty local tensor
        p.ds_id, p.ds_shape = 0, p.shape
        p.data = p.data.new_empty(0)
    groups = {g["name"]: g for g in param_groups(toy, OptimSection(weight_decay=0.1), shape_of=zero3.full_shape)}
    assert [p.ds_shape for p in groups["decay"]["params"]] == [(4, 4)]
    assert len(groups["no_decay"]["params"]) == 4
    assert len(param_groups(toy, OptimSection())[0]["params"]) == 0  # the local shape alone would decay nothing

"""`bigtx train` with optim.z_loss on 2 gloo ranks.

The run has the golden run's spec, data and seed (tests/distributed/test_golden_loss.py) plus the
z-loss, so at step 1 its cross-entropy is the golden first loss and its loss that plus the weighted
z term; from step 2 the z term's gradient has moved the weights, so the CE is no longer golden. With
distill (the teacher the student's initial weights, as in test_distill) the same holds with KD 0.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bigtx.config import load_spec
from tests.distributed.test_distill import train_with_the_initial_student_as_teacher
from tests.distributed.test_golden_loss import GOLDEN, OVERRIDES, RELATIVE
from tests.harness import tiny_overrides, train, train_records

pytestmark = pytest.mark.slow


def test_z_loss_is_added_to_the_golden_cross_entropy_and_logged(tmp_path: Path, byte_shards: Path) -> None:
    golden = json.loads(GOLDEN.read_text())["losses"]
    z_loss = 1e-2
    run_dir = tmp_path / "run"
    extra = [*OVERRIDES, "train.max_steps=2", "schedule.warmup_steps=1", f"optim.z_loss={z_loss}"]
    train("tiny", tiny_overrides(run_dir, byte_shards, *extra), 2, tmp_path / "logs", env={"OMP_NUM_THREADS": "1"})
    records = train_records(run_dir)
    assert sorted(records) == [1, 2]
    first, second = records[1], records[2]
    assert first["ce_loss"] == pytest.approx(golden["1"], rel=RELATIVE, abs=0)
    # log(Z) of a near-uniform initial softmax over the vocabulary is about log(V)
    assert first["z_loss"] == pytest.approx(math.log(load_spec("tiny").model.vocab_size) ** 2, rel=0.1)
    for r in records.values():
        # the parts are means over ranks as the total is: equal up to fp32/fp64 rounding
        assert r["loss_step"] == pytest.approx(r["ce_loss"] + z_loss * r["z_loss"], rel=1e-6, abs=0)
    assert second["ce_loss"] != pytest.approx(golden["2"], rel=1e-4)
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    assert [e.value for e in events.Scalars("train/z_loss")] == pytest.approx([r["z_loss"] for r in records.values()])


def test_distill_with_z_loss_adds_the_students_z_term(tmp_path: Path, byte_shards: Path) -> None:
    # the teacher is the student's initial weights (as in test_distill): KD is 0 at step 1
    golden = json.loads(GOLDEN.read_text())["losses"]
    alpha, z_loss = 0.25, 1e-2
    extra = [f"distill.alpha={alpha}", f"optim.z_loss={z_loss}"]
    records = train_with_the_initial_student_as_teacher(tmp_path, byte_shards, *OVERRIDES, *extra)
    first = records[1]
    assert first["kd_loss"] == 0.0 and first["ce_loss"] == pytest.approx(golden["1"], rel=RELATIVE, abs=0)
    assert first["z_loss"] == pytest.approx(math.log(load_spec("tiny").model.vocab_size) ** 2, rel=0.1)
    for r in records.values():
        parts = (1 - alpha) * r["ce_loss"] + alpha * r["kd_loss"] + z_loss * r["z_loss"]
        assert r["loss_step"] == pytest.approx(parts, rel=1e-6, abs=0)

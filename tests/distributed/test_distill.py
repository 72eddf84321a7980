"""`bigtx train` with a distill section on 2 gloo ranks.

The teacher is the student's own initial weights: at step 1 both give the same distribution, so the
KD term is exactly 0 and the first loss is (1 - alpha) times the golden run's cross-entropy (the
golden run has the same spec, data and seed). A teacher fed other tokens than the student, a KD
term computed on other rows, or alpha applied wrongly all move it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bigtx.config import load_spec
from bigtx.export import WeightSource, export_safetensors
from bigtx.export.types import expected_shapes
from bigtx.model import Transformer
from tests.distributed.test_golden_loss import GOLDEN, OVERRIDES, RELATIVE
from tests.harness import tiny_overrides, train, train_records

pytestmark = pytest.mark.slow


def test_a_teacher_equal_to_the_initial_student_adds_nothing_at_step_one(tmp_path: Path, byte_shards: Path) -> None:
    golden = json.loads(GOLDEN.read_text())["losses"]
    overrides = [*OVERRIDES, "train.max_steps=2", "schedule.warmup_steps=1"]  # the later max_steps wins
    spec = load_spec("tiny", overrides)
    student = Transformer(spec.model)
    student.init_weights(spec.run.seed)  # as bigtx.train.build_model does
    state = student.state_dict()
    source = WeightSource(tmp_path, spec, "initial student", expected_shapes(spec.model), lambda key: state[key])
    export_safetensors(source, tmp_path / "teacher")

    alpha = 0.25
    distill = [f"distill.teacher={tmp_path / 'teacher'}", f"distill.alpha={alpha}", "distill.temperature=2.0"]
    run_dir = tmp_path / "run"
    train("tiny", tiny_overrides(run_dir, byte_shards, *overrides, *distill), 2, tmp_path / "logs",
          env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    records = train_records(run_dir)
    assert sorted(records) == [1, 2]
    assert records[1]["loss_step"] == pytest.approx((1 - alpha) * golden["1"], rel=RELATIVE, abs=0)
    # after one update the student has moved away from its teacher: KD is no longer 0
    assert math.isfinite(records[2]["loss_step"])
    assert records[2]["loss_step"] != pytest.approx((1 - alpha) * golden["2"], rel=1e-4)

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


def train_with_the_initial_student_as_teacher(work: Path, shards: Path, *overrides: str) -> dict[int, dict]:
    """Per-step metrics of a 2-step run whose teacher is an export of the student's initial weights."""
    spec = load_spec("tiny", [o for o in overrides if not o.startswith("distill.")])  # no teacher yet
    student = Transformer(spec.model)
    student.init_weights(spec.run.seed)  # as bigtx.train.build_model does
    state = student.state_dict()
    source = WeightSource(work, spec, "initial student", expected_shapes(spec.model), lambda key: state[key])
    export_safetensors(source, work / "teacher")
    run_dir = work / "run"
    extra = [*overrides, "train.max_steps=2", "schedule.warmup_steps=1", f"distill.teacher={work / 'teacher'}"]
    train("tiny", tiny_overrides(run_dir, shards, *extra), 2, work / "logs", env={"OMP_NUM_THREADS": "1"})
    records = train_records(run_dir)
    assert sorted(records) == [1, 2] and all(math.isfinite(r["loss_step"]) for r in records.values())
    return records


def test_fp32_first_loss_is_the_golden_cross_entropy_times_one_minus_alpha(tmp_path: Path, byte_shards: Path) -> None:
    golden = json.loads(GOLDEN.read_text())["losses"]
    alpha = 0.25
    distill = [f"distill.alpha={alpha}", "distill.temperature=2.0"]
    records = train_with_the_initial_student_as_teacher(tmp_path, byte_shards, *OVERRIDES, *distill)
    assert records[1]["loss_step"] == pytest.approx((1 - alpha) * golden["1"], rel=RELATIVE, abs=0)
    # after one update the student has moved away from its teacher: KD is no longer 0
    assert records[2]["loss_step"] != pytest.approx((1 - alpha) * golden["2"], rel=1e-4)


def test_bf16_zero3_teacher_runs_in_the_students_precision(tmp_path: Path, byte_shards: Path) -> None:
    # KD only (alpha 1) over the teacher's top 8 tokens: 0 at step 1 exactly when the replicated bf16
    # teacher computes what the partitioned bf16 student does
    distill = ["distill.alpha=1.0", "distill.top_k=8", "distill.kind=reverse_kl"]
    records = train_with_the_initial_student_as_teacher(
        tmp_path, byte_shards, "precision=bf16", "zero.stage=3", "train.log_every=1", *distill
    )
    assert records[1]["loss_step"] == 0.0

"""`bigtx train` with a distill section on 2 gloo ranks.

The teacher is the student's own initial weights: at step 1 both give the same distribution, so the
KD term is exactly 0 and the first loss is (1 - alpha) times the golden run's cross-entropy (the
golden run has the same spec, data and seed). A teacher fed other tokens than the student, a KD
term computed on other rows, or alpha applied wrongly all move it. The logged parts (``ce_loss``,
``kd_loss``, ``teacher_ce``) then are the golden CE, 0, and the golden CE again.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bigtx.config import load_spec
from bigtx.export import WeightSource, export_safetensors
from bigtx.export.types import expected_shapes
from bigtx.model import Transformer
from tests.distributed.test_golden_loss import GOLDEN, OVERRIDES, RELATIVE
from tests.harness import REPO, base_env, kill_after, start, tiny_overrides, train, train_records
from tests.unit.test_distill import TEACHER, export_teacher, reference

pytestmark = pytest.mark.slow


def export_initial_student(work: Path, *overrides: str) -> Path:
    """An export of the initial weights of the student the `tiny` spec with ``overrides`` trains."""
    spec = load_spec("tiny", [o for o in overrides if not o.startswith("distill.")])  # no teacher yet
    student = Transformer(spec.model)
    student.init_weights(spec.run.seed)  # as bigtx.train.build_model does
    state = student.state_dict()
    source = WeightSource(work, spec, "initial student", expected_shapes(spec.model), lambda key: state[key])
    export_safetensors(source, work / "teacher")
    return work / "teacher"


def train_with_the_initial_student_as_teacher(work: Path, shards: Path, *overrides: str) -> dict[int, dict]:
    """Per-step metrics of a 2-step run whose teacher is an export of the student's initial weights."""
    teacher = export_initial_student(work, *overrides)
    run_dir = work / "run"
    extra = [*overrides, "train.max_steps=2", "schedule.warmup_steps=1", f"distill.teacher={teacher}"]
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

    # the logged parts: at step 1 the teacher computes what the student does
    first, second = records[1], records[2]
    assert first["kd_loss"] == 0.0 and first["teacher_ce"] == first["ce_loss"]
    assert first["ce_loss"] == pytest.approx(golden["1"], rel=RELATIVE, abs=0)
    # one update lowers the student's CE below its frozen initial self's
    assert second["kd_loss"] > 0 and second["ce_loss"] < second["teacher_ce"]
    for r in records.values():
        assert r["loss"] == pytest.approx((1 - alpha) * r["ce_loss"] + alpha * r["kd_loss"], rel=1e-6, abs=0)
        assert r["teacher_time_s"] > 0 and 0 < r["teacher_share"] < 1
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    assert [e.value for e in events.Scalars("train/kd_loss")] == pytest.approx([r["kd_loss"] for r in records.values()])


@pytest.mark.parametrize("placement", ["replicated", "sharded"])
def test_bf16_zero3_teacher_runs_in_the_students_precision(tmp_path: Path, byte_shards: Path, placement: str) -> None:
    # KD only (alpha 1) over the teacher's top 8 tokens: 0 at step 1 exactly when the bf16 teacher,
    # whole on each rank or partitioned as a ZeRO-3 engine of its own, computes what the partitioned
    # bf16 student does
    distill = ["distill.alpha=1.0", "distill.top_k=8", "distill.kind=reverse_kl", f"distill.placement={placement}"]
    records = train_with_the_initial_student_as_teacher(
        tmp_path, byte_shards, "precision=bf16", "zero.stage=3", "train.log_every=1", *distill
    )
    assert records[1]["loss_step"] == 0.0
    assert ("partitioned" in (tmp_path / "run" / "train.log").read_text()) == (placement == "sharded")


def test_a_sharded_teacher_of_a_zero2_student_gives_the_golden_first_loss(tmp_path: Path, byte_shards: Path) -> None:
    golden = json.loads(GOLDEN.read_text())["losses"]
    distill = ["distill.alpha=0.25", "distill.placement=sharded"]
    records = train_with_the_initial_student_as_teacher(tmp_path, byte_shards, *OVERRIDES, *distill)
    assert records[1]["kd_loss"] == 0.0
    assert records[1]["loss_step"] == pytest.approx(0.75 * golden["1"], rel=RELATIVE, abs=0)


def test_the_logged_parts_are_window_means_also_across_a_resume(tmp_path: Path, byte_shards: Path) -> None:
    """As ``loss`` (tests/distributed/test_train.py): a run logging every 3 steps, killed after its
    checkpoint at step 2 (or 4) and resumed, logs exactly the window means of an every-step run."""
    common = ["precision=fp32", "train.max_steps=6", "schedule.warmup_steps=1", "checkpoint.every_steps=2",
              "train.eval_every=0", "distill.alpha=0.5"]  # fmt: skip
    common.append(f"distill.teacher={export_initial_student(tmp_path, *common)}")
    every = tmp_path / "every"
    train("tiny", tiny_overrides(every, byte_shards, "train.log_every=1", *common), 2, tmp_path / "logs")
    steps = train_records(every)
    sparse = tmp_path / "sparse"
    overrides = tiny_overrides(sparse, byte_shards, "train.log_every=3", *common)
    kill_after(start("tiny", overrides, 2, tmp_path / "logs"), sparse / "checkpoints/step_00000002/COMPLETE.json")
    train("tiny", overrides, 2, tmp_path / "logs")
    assert "resumed from" in (sparse / "train.log").read_text()
    logged = train_records(sparse)
    assert sorted(logged) == [3, 6]
    for end in (3, 6):
        for key in ("loss", "ce_loss", "kd_loss", "teacher_ce"):
            assert logged[end][key] == sum(steps[s][key] for s in range(end - 2, end + 1)) / 3, (end, key)


def test_a_teacher_cache_trains_as_online_top_k_resumes_on_another_layout_and_is_checked(
    tmp_path: Path, byte_shards: Path
) -> None:
    """`bigtx distill cache` for 2 ranks, then training from it: the losses of an online top-k run
    (fp16 log-probs: within 1e-4), also after a kill and a resume on 1 rank with 2 loader workers (the
    same 2 data slots). A cache of other data, or with a damaged shard, is refused with exit code 2."""
    teacher = export_teacher(reference(TEACHER), tmp_path)
    common = ["precision=fp32", "train.max_steps=4", "schedule.warmup_steps=1", "train.eval_every=0",
              "checkpoint.every_steps=2", "train.global_batch_size=8", "train.grad_accum=null", "distill.alpha=0.5",
              "distill.top_k=8", "distill.temperature=2.0", f"distill.teacher={teacher}"]  # fmt: skip
    logs = tmp_path / "logs"
    online = tmp_path / "online"
    train("tiny", tiny_overrides(online, byte_shards, *common), 2, logs)
    cache = tmp_path / "cache"
    build = [sys.executable, "-m", "bigtx", "distill", "cache", "tiny", *(f"--set={o}" for o in common)]
    build += ["--data", str(byte_shards), "--world-size", "2", "--shard-size", "20KB", "--out", str(cache)]
    subprocess.run(build, check=True, capture_output=True, env=base_env(), cwd=REPO)

    cached = tmp_path / "cached"
    overrides = tiny_overrides(cached, byte_shards, *common, f"distill.source={cache}")
    kill_after(start("tiny", overrides, 2, logs), cached / "checkpoints/step_00000002/COMPLETE.json")
    train("tiny", [*overrides, "data.num_workers=2"], 1, logs)
    assert "resumed from" in (cached / "train.log").read_text()
    expected, got = train_records(online), train_records(cached)
    assert sorted(got) == [1, 2, 3, 4]
    for step in got:
        for key in ("loss", "ce_loss", "teacher_ce"):
            assert got[step][key] == pytest.approx(expected[step][key], rel=1e-4, abs=0), (step, key)
        assert got[step]["kd_loss"] == pytest.approx(expected[step]["kd_loss"], rel=1e-2, abs=0), step

    # other data: the same shards but one; refused before any process group
    fewer = tmp_path / "fewer"
    shutil.copytree(byte_shards, fewer)
    index = json.loads((fewer / "index.json").read_text())
    index["splits"]["train"]["shards"].pop()
    (fewer / "index.json").write_text(json.dumps(index))
    run = train(
        "tiny", tiny_overrides(tmp_path / "other", fewer, *common, f"distill.source={cache}"), 1, logs, expect=2
    )
    assert f"distill.source: the teacher cache {cache} was built for another data.train" in run.output()
    # a damaged shard of each slot: each rank stops at its first step, naming it
    for shard in cache.glob("slot*-000000.tar"):
        data = bytearray(shard.read_bytes())
        data[1000] ^= 0xFF
        shard.write_bytes(bytes(data))
    run = train(
        "tiny", tiny_overrides(tmp_path / "damaged", byte_shards, *common, f"distill.source={cache}"), 2, logs, expect=2
    )
    assert (
        f"shard {cache / 'slot00000-000000.tar'} is damaged: its sha256 is not the one manifest.json records"
        in run.output()
    )


def test_a_resume_on_another_number_of_data_slots_switches_to_a_cache_built_for_it(
    tmp_path: Path, byte_shards: Path
) -> None:
    """A 2-rank online run, resumed on 1 rank (2 data slots -> 1: the loader restarts the epoch in the new
    order, data.allow_reshuffle) with `distill.source` switched to a cache built for 1 slot, trains as the
    same resume with the teacher online (fp16 log-probs: within 1e-4); the switch is warned about."""
    teacher = export_teacher(reference(TEACHER), tmp_path)
    common = ["precision=fp32", "schedule.warmup_steps=1", "train.eval_every=0", "checkpoint.every_steps=2",
              "train.global_batch_size=8", "train.grad_accum=null", "distill.alpha=0.5", "distill.top_k=8",
              f"distill.teacher={teacher}"]  # fmt: skip
    logs = tmp_path / "logs"
    online = tmp_path / "online"
    train("tiny", tiny_overrides(online, byte_shards, *common, "train.max_steps=2"), 2, logs)
    cached = tmp_path / "cached"
    shutil.copytree(online, cached)
    cache = tmp_path / "cache"
    build = [sys.executable, "-m", "bigtx", "distill", "cache", "tiny", *(f"--set={o}" for o in common)]
    build += ["--set=train.max_steps=4", "--data", str(byte_shards), "--world-size", "1", "--out", str(cache)]
    subprocess.run(build, check=True, capture_output=True, env=base_env(), cwd=REPO)

    resume = [*common, "train.max_steps=4", "data.allow_reshuffle=true"]
    train("tiny", tiny_overrides(online, byte_shards, *resume), 1, logs)
    run = train("tiny", tiny_overrides(cached, byte_shards, *resume, f"distill.source={cache}"), 1, logs)
    assert f"distill.source: 'online' -> '{cache}'" in run.output()
    expected, got = train_records(online), train_records(cached)
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in ("loss", "ce_loss", "teacher_ce"):
            assert got[step][key] == pytest.approx(expected[step][key], rel=1e-4, abs=0), (step, key)
        assert got[step]["kd_loss"] == pytest.approx(expected[step]["kd_loss"], rel=1e-2, abs=0), step

"""optim.z_loss in the training step: the values micro_batch_loss logs, and the metrics window's sums."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from bigtx import train
from bigtx.config import load_spec
from bigtx.distill import TeacherClock
from bigtx.model import Transformer


def _job(z_loss: float) -> SimpleNamespace:
    spec = load_spec("tiny", [f"optim.z_loss={z_loss}"])
    model = Transformer(spec.model)
    model.init_weights(spec.run.seed)
    return SimpleNamespace(spec=spec, engine=model, teacher=None, documents=lambda x: None)


@pytest.mark.parametrize("z_loss", [1e-4, 1e-2])
def test_micro_batch_loss_adds_the_z_term_to_the_models_own_cross_entropy(z_loss: float) -> None:
    job = _job(z_loss)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, job.spec.model.vocab_size, (2, 16), generator=gen)
    y = torch.randint(0, job.spec.model.vocab_size, (2, 16), generator=gen)
    y[0, :3] = -100
    loss, values = train.micro_batch_loss(job, x, y, TeacherClock())  # type: ignore[arg-type]
    assert train.loss_parts(job.spec) == ("ce_loss", "z_loss") and values.shape == (3,)
    total, ce, z = values
    # the CE part is what the model's own loss (the plain path) computes, bit for bit
    with torch.no_grad():
        assert torch.equal(ce, job.engine(x, y))
        logits = job.engine(x).flatten(0, 1).double()[y.flatten() != -100]
    torch.testing.assert_close(z.double(), torch.logsumexp(logits, dim=-1).square().mean(), rtol=1e-6, atol=0)
    assert total == ce + z_loss * z and torch.equal(loss.detach(), total) and z > 0
    loss.backward()  # the fused backward runs through the model
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in job.engine.parameters())


def test_a_plain_run_logs_the_loss_alone() -> None:
    job = _job(0.0)
    assert train.loss_parts(job.spec) == ()
    x = torch.zeros(1, 8, dtype=torch.long)
    _, values = train.micro_batch_loss(job, x, x, TeacherClock())  # type: ignore[arg-type]
    assert values.shape == (1,)


def test_the_metrics_window_saves_the_z_sums_and_resumes_an_older_checkpoint() -> None:
    result = train.StepResult(torch.zeros(3), 0.0, 0.0, TeacherClock())
    window = train.LogWindow()
    for losses in ([2.5, 2.25, 25.0], [2.0, 1.75, 25.0]):
        window.add(losses, 0.1, result, 8, ("ce_loss", "z_loss"))
    # as a checkpoint's meta.json carries it
    resumed = train.LogWindow.restored(json.loads(json.dumps(window.saved())))
    assert (resumed.loss, resumed.steps, resumed.z_loss, resumed.z_steps) == (4.5, 2, [4.0, 50.0], 2)
    assert resumed.distill is None
    # a checkpoint from before the z parts were logged: they average the steps after the resume
    older = train.LogWindow.restored({"loss": 2.0, "steps": 2})
    older.add([1.5, 1.25, 25.0], 0.1, result, 8, ("ce_loss", "z_loss"))
    assert (older.loss, older.steps, older.z_loss, older.z_steps) == (3.5, 3, [1.25, 25.0], 1)


def test_the_metrics_window_of_distill_with_z_loss_keeps_both_sums() -> None:
    result = train.StepResult(torch.zeros(5), 0.0, 0.0, TeacherClock())
    window = train.LogWindow()
    for losses in ([2.5, 2.25, 0.5, 3.0, 25.0], [2.0, 1.75, 0.25, 2.75, 24.0]):
        window.add(losses, 0.1, result, 8, ("ce_loss", "kd_loss", "teacher_ce", "z_loss"))
    resumed = train.LogWindow.restored(json.loads(json.dumps(window.saved())))
    assert (resumed.loss, resumed.steps) == (4.5, 2)
    assert (resumed.distill, resumed.distill_steps) == ([4.0, 0.75, 5.75], 2)
    assert (resumed.z_loss, resumed.z_steps) == ([4.0, 49.0], 2)


def test_loss_parts_of_distill_with_z_loss(tmp_path) -> None:  # type: ignore[no-untyped-def]
    spec = load_spec("tiny", [f"distill.teacher={tmp_path}", "optim.z_loss=1e-4"])
    assert train.loss_parts(spec) == ("ce_loss", "kd_loss", "teacher_ce", "z_loss")
    assert train.loss_parts(load_spec("tiny", [f"distill.teacher={tmp_path}"])) == ("ce_loss", "kd_loss", "teacher_ce")

"""The main job: ``bigtx train SPEC`` (also ``python -m bigtx.train SPEC`` and ``deepspeed -m bigtx.train SPEC``).

Read top to bottom: ``main`` checks everything that can be checked before a process group exists;
``train`` starts the rank's heartbeat (``bigtx.heartbeat``: each phase the loop marks, and stack dumps
when one stalls); ``run`` starts the process group, plans the resume (``bigtx.checkpoint.resume``),
``build``s model, DeepSpeed engine and data, ``restore``s a checkpoint if there is one and hands over
to ``fit``, the loop: ``train_step``, one collective, (with a ``stability`` section: apply, skip or
rewind the held update, ``judge_update``), log (with one more, naming the slowest rank), evaluate,
checkpoint, stop.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import random
import resource
import socket
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml

import bigtx
from bigtx import checkpoint, distributed, heartbeat, held_update, lifetime, zero3
from bigtx.checkpoint.resume import FINISHED, ResumePlan, plan_resume
from bigtx.checkpoint.saver import Saver
from bigtx.config import RunSpec, SpecError, add_spec_args, load_spec, spec_hash, spec_to_dict
from bigtx.config.deepspeed_config import derive_deepspeed_config, derive_teacher_config
from bigtx.config.layout import check_layout
from bigtx.data import DataError, build_loader, build_val_loaders, check_data
from bigtx.distill import OnlineTeacher, TeacherClock, open_teacher, sharded_teacher
from bigtx.distributed import EXIT_ERROR, EXIT_FINISHED, EXIT_REQUEUE, EXIT_USAGE, DistEnv
from bigtx.export import open_model
from bigtx.export.types import DTYPES
from bigtx.heartbeat import Heartbeat
from bigtx.memory_check import memory_report
from bigtx.metrics import MetricsLogger, peak_tflops
from bigtx.model import Transformer
from bigtx.model.distill_loss import distill_loss
from bigtx.model.documents import Documents, find_documents
from bigtx.model.loss import cross_entropy_parts
from bigtx.model.weights import load_weights, weight_reader
from bigtx.optim import lr_at, param_groups
from bigtx.stability import Decision, RewindRecord, SpikeGuard, StabilityStop, Verdict, read_record, write_record
from bigtx.teacher_cache import CachedTeacher, check_cache

log = logging.getLogger("bigtx")


@dataclass
class Progress:
    """What the loop has done so far; saved in every checkpoint."""

    step: int = 0
    tokens: int = 0


# --------------------------------------------------------------------------------------------
# Before the process group: every check that does not need other ranks.


def preflight(spec: RunSpec, env: DistEnv) -> dict[str, Any]:
    """Validate what depends on the world size, the environment and the data; returns the DeepSpeed config.

    Raises ``SpecError``/``DataError``/``ValueError`` with a message naming the field or variable.
    """
    teacher = None  # the online teacher's model section, for the memory plan
    if spec.distill is not None and spec.distill.source == "online":
        teacher = open_teacher(spec.distill.teacher, spec.data, spec.model.vocab_size).spec.model
    elif spec.distill is not None:
        check_cache(spec, env.world_size)
    try:
        ds_config = derive_deepspeed_config(spec, env.world_size)
        check_layout(spec.zero, env.world_size, env.local_world_size, torch.cuda.is_available())
    except ValueError as exc:
        raise SpecError([str(exc)]) from None
    if spec.data.train is None:
        raise SpecError(["data.train: no training data; give a `bigtx data build` directory or shard pattern"])
    distributed.timeout()
    lifetime.stop_grace()
    check_data(spec.data, spec.model.vocab_size, env.world_size)
    if env.is_main:
        # before anything is built: a run that will not fit says so while it is cheap to change
        zero = ds_config["zero_optimization"]
        summary, warning = memory_report(spec, env.world_size, env.local_world_size, zero, teacher)
        print(f"bigtx: {summary}", flush=True)
        if warning:
            print(f"bigtx: warning: {warning}", file=sys.stderr, flush=True)
    return ds_config


def setup_logging(run_dir: Path, env: DistEnv, ds_level: str) -> None:
    import deepspeed

    deepspeed.utils.logger.setLevel(ds_level.upper())
    # torch deprecation notices from inside DeepSpeed's collectives say nothing to a bigtx user
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    log.setLevel(logging.INFO)
    log.propagate = False
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(logging.Formatter(f"[bigtx rank {env.rank}] %(levelname)s %(message)s"))
    # rank 0 tells the story; the other ranks speak only when something is wrong
    stderr.setLevel(logging.INFO if env.is_main else logging.WARNING)
    log.addHandler(stderr)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(run_dir / "train.log")
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(to_file)


# --------------------------------------------------------------------------------------------
# Small helpers the loop uses.


def all_reduce_sum(values: torch.Tensor) -> list[float]:
    """Sum a small float64 vector over the ranks and bring it to the host: one collective, and on
    GPUs the step's one CPU-GPU sync point."""
    if dist.get_world_size() > 1:
        values = values.to(distributed.device_of_backend())
        dist.all_reduce(values)
    return values.cpu().tolist()


def rng_state() -> dict[str, Any]:
    """The RNG states of this rank as plain data and tensors (loadable with ``weights_only=True``)."""
    version, keys, gauss = random.getstate()
    _, mt, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(keys), gauss],
        "numpy": {"keys": mt.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": cached},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore ``rng_state()``'s result (also the tuple form of checkpoints from bigtx 0.1)."""
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    saved = state["numpy"]
    if isinstance(saved, dict):
        keys = np.asarray(saved["keys"], dtype=np.uint32)
        saved = ("MT19937", keys, saved["pos"], saved["has_gauss"], saved["cached_gaussian"])
    np.random.set_state(saved)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int, rank: int) -> None:
    """Same weights on every rank (the model seeds its own init); per-rank streams for dropout."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


# --------------------------------------------------------------------------------------------
# Building and restoring.


@dataclass
class Job:
    """Everything ``fit`` works with: the engine, the data and the sizes derived from the spec."""

    spec: RunSpec
    env: DistEnv
    engine: Any
    train_loader: Any
    val_loaders: dict[str | None, Any]  # per named data.val source, or one (key None); empty: no validation
    group_names: list[list[str]]  # parameter names per optimizer group, for the exporter
    accum: int
    global_batch: int
    total_steps: int
    device: torch.device
    teacher: OnlineTeacher | CachedTeacher | None = None  # distill: run each step, or read from its cache
    guard: SpikeGuard | None = None  # with a stability section: each step's update is judged before it is applied
    document_eos: int | None = None  # data.document_mask: the EOS id that ends each document; None: off

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.spec.data.seq_len

    def documents(self, input_ids: torch.Tensor) -> Documents | None:
        """The documents of a packed batch under ``data.document_mask``; None (attend across the row) without."""
        return None if self.document_eos is None else find_documents(input_ids, self.document_eos)

    @functools.cached_property
    def saver(self) -> Saver:
        """Writes this job's checkpoints (``bigtx.checkpoint.saver``), in the background with ``checkpoint.async``."""
        ckpt = self.spec.checkpoint
        return Saver(
            self.engine,
            Path(self.spec.run.dir) / "checkpoints",
            background=ckpt.async_,
            keep_last=ckpt.keep_last,
            keep_every=ckpt.keep_every,
            commit_timeout_s=distributed.timeout().total_seconds(),
        )

    def close(self) -> None:
        """Stop the loaders' worker processes."""
        for loader in (self.train_loader, *self.val_loaders.values()):
            loader.close()


def build_model(spec: RunSpec, rank: int, world_size: int, ds_config: dict[str, Any], fresh: bool) -> Transformer:
    """The model with its initial weights: from ``model.init_from`` when ``fresh`` (no checkpoint to
    resume), else from ``run.seed`` (identical on every rank and for every ZeRO stage).

    Under ZeRO-3 it is built partitioned (``bigtx.zero3``): no rank ever holds the whole model, and
    the initial values are written parameter by parameter while each is gathered.
    """
    partitioned = spec.zero.stage == 3
    with zero3.partitioned_construction(ds_config, partitioned):
        model = Transformer(spec.model)
    model.refill_buffers()
    if not partitioned:
        model.init_weights(spec.run.seed)
        if spec.model.init_from and fresh:
            load_weights(model, spec.model.init_from)
    else:
        shapes = {name: zero3.full_shape(p) for name, p in model.named_parameters()}
        value_of = (
            weight_reader(spec.model.init_from, spec.model, shapes)
            if spec.model.init_from and fresh
            else functools.partial(model.initial_value, seed=spec.run.seed)
        )
        zero3.write_parameters(model, value_of, rank, world_size)
    if spec.model.init_from and fresh:
        log.info("initialised weights from %s", spec.model.init_from)
    return model


def build(spec: RunSpec, env: DistEnv, ds_config: dict[str, Any], plan: ResumePlan) -> Job:
    """Model (identical initial weights on every rank, from run.seed), DeepSpeed engine, loaders."""
    import deepspeed

    seed_everything(spec.run.seed, env.rank)
    model = build_model(spec, env.rank, env.world_size, ds_config, fresh=plan.checkpoint is None)
    checkpoint.mark_universal_capable(model)

    groups = param_groups(model, spec.optim, shape_of=zero3.full_shape)
    names = {id(p): name for name, p in model.named_parameters()}
    group_names = [[names[id(p)] for p in group["params"]] for group in groups]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    if spec.stability is not None:
        held_update.check(engine)
    micro, accum, global_batch = spec.batch_sizes(env.world_size)

    loader_args = dict(
        seq_len=spec.data.seq_len,
        micro_batch_size=micro,
        rank=env.rank,
        world_size=env.world_size,
        seed=spec.run.seed,
        vocab_size=spec.model.vocab_size,
    )
    train_loader = build_loader(spec.data, split="train", **loader_args)
    try:
        val_loaders = build_val_loaders(spec.data, **loader_args)
    except DataError as exc:
        log.warning("no validation: %s", exc)
        val_loaders = {}
    teacher: OnlineTeacher | CachedTeacher | None = None
    if spec.distill is not None and spec.distill.source == "online":
        source = open_teacher(spec.distill.teacher, spec.data, spec.model.vocab_size)
        if spec.distill.sharded(spec.zero.stage):
            model = sharded_teacher(source, derive_teacher_config(ds_config), env.rank, env.world_size)
            log.info("teacher %s partitioned over %d ranks (ZeRO-3, no optimizer)", source.describe(), env.world_size)
        else:
            model = open_model(source, DTYPES[spec.precision], distributed.device(env))
        teacher = OnlineTeacher(model)
    elif spec.distill is not None:
        teacher = CachedTeacher(spec.distill.source, check_cache(spec, env.world_size), distributed.device(env))
    return Job(
        spec,
        env,
        engine,
        train_loader,
        val_loaders,
        group_names,
        accum,
        global_batch,
        spec.total_steps(env.world_size),
        distributed.device(env),
        teacher,
        SpikeGuard(spec.stability) if spec.stability is not None else None,
        document_eos=train_loader.cfg.eos_id if spec.data.document_mask else None,
    )


def restore(job: Job, plan: ResumePlan) -> tuple[Progress, LogWindow]:
    """Load engine, data position and RNG state of the planned checkpoint; returns the progress and
    the metrics window saved with it."""
    path, meta, env = plan.checkpoint, plan.meta, job.env
    assert path is not None
    job.engine.load_checkpoint(str(plan.load_dir.parent), tag=plan.load_dir.name, load_lr_scheduler_states=False)
    if meta["world_size"] == env.world_size:
        state = checkpoint.load_rank_state(path, env.rank)
        job.train_loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
    else:
        old = [checkpoint.load_rank_state(path, r)["loader"] for r in range(meta["world_size"])]
        job.train_loader.load_resharded_state(old)
        seed_everything(job.spec.run.seed + meta["step"], env.rank)
    if job.guard is not None:
        restore_guard(job, path, meta)
    log.info("resumed from %s at step %d (%d tokens seen)", path, meta["step"], meta["tokens"])
    return Progress(step=meta["step"], tokens=meta["tokens"]), LogWindow.restored(meta.get("log_window", {}))


def restore_guard(job: Job, path: Path, meta: dict[str, Any]) -> None:
    """The spike guard's state saved in checkpoint ``path`` (none in one saved without the stability
    section), and, when the last rewind went back to ``path``, its counters and the data it skipped."""
    guard = job.guard
    assert guard is not None
    if "stability" in meta:
        guard.restore(meta["stability"])
    record = read_record(path.parent)
    if record is None or record.checkpoint != path.name:
        return
    record.apply(guard)
    micro_batches = record.skip_batches * job.accum
    for _ in islice(iter(job.train_loader), micro_batches):
        pass
    job.train_loader.close()
    log.warning("rewind %d: skipped %d batches of data after %s", record.rewinds, record.skip_batches, path.name)


def save_checkpoint(job: Job, progress: Progress, window: LogWindow) -> Path:
    spec, env = job.spec, job.env
    rank_state = {"loader": job.train_loader.state_dict(), "rng": rng_state(), "rank": env.rank}
    meta = {
        "step": progress.step,
        "tokens": progress.tokens,
        "world_size": env.world_size,
        "zero_stage": spec.zero.stage,
        "spec": spec_to_dict(spec),
        "spec_hash": spec_hash(spec),
        "bigtx_version": bigtx.__version__,
        # which parameters each optimizer group holds, in order: ZeRO-0 checkpoints store the fp32
        # master weights as one flat tensor per group, and the exporter needs this to cut them up
        "param_groups": job.group_names,
        # so that the first logged loss after a resume averages the same steps as without one
        "log_window": window.saved(),
    }
    if job.guard is not None:
        meta["stability"] = job.guard.saved()
    t0 = time.perf_counter()
    path = job.saver.save(progress.step, rank_state, meta)
    log.info("checkpoint %s: training paused %.2fs for it", path.name, time.perf_counter() - t0)
    return path


def announce(job: Job, ds_config: dict[str, Any], hosts: list[str], progress: Progress) -> None:
    """Rank 0: write RUN_DIR/spec.yaml (with the derived DeepSpeed config) and say what is trained."""
    spec, env = job.spec, job.env
    run_dir = Path(spec.run.dir)
    header = (
        f"# Resolved run spec, written by bigtx {bigtx.__version__}. `bigtx train {run_dir / 'spec.yaml'}` reruns it.\n"
    )
    ds_lines = "".join(f"# {line}\n" for line in json.dumps(ds_config, indent=2).splitlines())
    (run_dir / "spec.yaml").write_text(
        header
        + yaml.safe_dump(spec_to_dict(spec), sort_keys=False)
        + f"\n# DeepSpeed config derived from this spec for world size {env.world_size}:\n"
        + ds_lines
    )
    log.info("ranks on hosts: %s", ", ".join(f"{r}:{h}" for r, h in enumerate(hosts)))
    log.info(
        "training %s: %s parameters, %d rank(s), ZeRO-%d, %s, global batch %d x %d tokens, steps %d -> %d",
        spec.run.name,
        f"{spec.model.num_params():,}",
        env.world_size,
        spec.zero.stage,
        spec.precision,
        job.global_batch,
        spec.data.seq_len,
        progress.step,
        job.total_steps,
    )


def open_metrics(job: Job, progress: Progress) -> MetricsLogger:
    """metrics.jsonl and TensorBoard (rank 0), cut back to ``progress``; a new run records its spec."""
    spec = job.spec
    metrics = MetricsLogger(Path(spec.run.dir), job.env.is_main, progress.step)
    if progress.step == 0:
        hparams = {
            "params": spec.model.num_params(),
            "world_size": job.env.world_size,
            "precision": spec.precision,
            "zero_stage": spec.zero.stage,
            "lr": spec.optim.lr,
            "global_batch": job.global_batch,
        }
        metrics.log_spec(spec_to_dict(spec), hparams)
    return metrics


# --------------------------------------------------------------------------------------------
# The loop.


@dataclass
class StepResult:
    # this rank's means over the step's micro-batches of [loss] and the parts ``loss_parts`` names:
    # [loss], with distill [loss, ce, kd, teacher_ce], with optim.z_loss [loss, ce, z], with both
    # [loss, ce, kd, teacher_ce, z]: float64, on the device
    losses: torch.Tensor
    data_wait: float  # seconds spent waiting for batches
    backward: float  # seconds in the backward passes, where the gradients are reduced: ranks wait for the slowest
    teacher: TeacherClock  # the teacher's forward passes (none without distill)
    # with job.guard: the update is held (not applied yet) and this is its gradient norm before clipping,
    # on rank 0; 0 elsewhere, so that the step's all-reduce hands every rank rank 0's value
    grad_norm: torch.Tensor | None = None


def train_step(job: Job, batches: Iterator, lr: float, beat: Heartbeat) -> StepResult:
    """One optimizer step: ``accum`` micro-batches, DeepSpeed accumulates, clips and steps; with
    ``job.guard`` the last ``engine.step()`` is left to ``fit``, once the step is judged.

    The losses stay on the device (no CPU-GPU sync per micro-batch); they are summed in float64 so
    each value equals the sum of the micro-batch values as Python floats. ``beat`` is told each phase.
    """
    engine = job.engine
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    sums = torch.zeros(1 + len(loss_parts(job.spec)), dtype=torch.float64, device=job.device)
    data_wait = backward = 0.0
    clock = TeacherClock()
    grad_norm = None
    for k in range(job.accum):
        t_data = beat.mark("data")
        x, y = next(batches)
        t_forward = beat.mark("forward")
        loss, values = micro_batch_loss(job, x.to(job.device), y.to(job.device), clock)
        t_backward = beat.mark("backward")
        engine.backward(loss)
        t_optimizer = beat.mark("optimizer")
        if job.guard is not None and k == job.accum - 1:
            norm = held_update.grad_norm(engine)
            grad_norm = torch.tensor([norm if job.env.is_main else 0.0], dtype=torch.float64, device=job.device)
        else:
            engine.step()
        sums += values.double()
        data_wait += t_forward - t_data
        backward += t_optimizer - t_backward
    return StepResult(sums / job.accum, data_wait, backward, clock, grad_norm)


def micro_batch_loss(
    job: Job, x: torch.Tensor, y: torch.Tensor, clock: TeacherClock
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss to differentiate: the student's cross-entropy, with ``optim.z_loss`` plus its z term,
    or with ``distill`` the fused (1 - alpha) * CE + alpha * KD (the teacher's forward, or the read of
    its cached rows at the loader's position, timed by ``clock``); and the values to log, detached:
    [loss] and ``loss_parts``."""
    z_loss = job.spec.optim.z_loss
    docs = job.documents(x)
    if job.teacher is None and not z_loss:
        loss = job.engine(x, y, documents=docs)
        return loss, loss.detach().view(1)
    if job.teacher is None:
        # nothing else holds the logits: their storage takes the gradient (as in Transformer.forward)
        logits = job.engine(x, documents=docs).flatten(0, 1)
        parts = cross_entropy_parts(logits, y.flatten(), z_loss=z_loss, overwrite_logits=True)
        return parts.total, torch.stack(parts).detach()
    d = job.spec.distill
    assert d is not None
    logits = job.engine(x, documents=docs).flatten(0, 1)
    with clock.timing(job.device):
        teacher = job.teacher.outputs(x, y, job.train_loader.last_rows(), docs)
    # nothing else holds the student's logits: their storage takes the gradient (as in Transformer.forward)
    losses = distill_loss(
        logits, teacher, y.flatten(), alpha=d.alpha, temperature=d.temperature, kind=d.kind, top_k=d.top_k,
        z_loss=z_loss, overwrite_logits=True,
    )  # fmt: skip
    return losses.total, torch.stack(losses if z_loss else losses[:4]).detach()


def loss_parts(spec: RunSpec) -> tuple[str, ...]:
    """The metrics names of the values ``micro_batch_loss`` logs after the loss."""
    distill = ("ce_loss", "kd_loss", "teacher_ce") if spec.distill is not None else ()
    if spec.optim.z_loss:
        return (distill or ("ce_loss",)) + ("z_loss",)
    return distill


@dataclass
class LogWindow:
    """Sums over the steps since the last metrics line, which reports their means.

    Only the loss parts are saved with a checkpoint: times measured by a process that has since died
    are not carried over (``timed`` counts the steps this process measured). ``distill_steps`` counts
    the steps in ``distill``: a checkpoint from before bigtx logged them has none; ``z_steps`` likewise.
    """

    loss: float = 0.0
    steps: int = 0
    distill: list[float] | None = None  # with distill: sums of [ce, kd, teacher_ce]
    distill_steps: int = 0
    z_loss: list[float] | None = None  # with optim.z_loss: sums of [ce, z]
    z_steps: int = 0
    timed: int = 0
    time: float = 0.0
    data: float = 0.0
    backward: float = 0.0
    teacher: float = 0.0
    tokens: int = 0

    def add(self, losses: list[float], step_time: float, result: StepResult, tokens: int, parts: Sequence[str]) -> None:
        """Add a step: ``losses`` as ``reduce_step`` returns them (the loss, then the values ``parts``
        names: ``loss_parts``), its time, ``train_step``'s result."""
        self.loss += losses[0]
        self.steps += 1
        named = dict(zip(parts, losses[1:], strict=True))
        if "kd_loss" in named:
            step = (named["ce_loss"], named["kd_loss"], named["teacher_ce"])
            self.distill = [total + value for total, value in zip(self.distill or [0.0] * 3, step)]
            self.distill_steps += 1
        if "z_loss" in named:
            step = (named["ce_loss"], named["z_loss"])
            self.z_loss = [total + value for total, value in zip(self.z_loss or [0.0] * 2, step)]
            self.z_steps += 1
        self.timed += 1
        self.time += step_time
        self.data += result.data_wait
        self.backward += result.backward
        self.teacher += result.teacher.seconds()
        self.tokens += tokens

    def saved(self) -> dict[str, Any]:
        distill = {"distill": self.distill, "distill_steps": self.distill_steps} if self.distill is not None else {}
        z_loss = {"z_loss": self.z_loss, "z_steps": self.z_steps} if self.z_loss is not None else {}
        return {"loss": self.loss, "steps": self.steps} | distill | z_loss

    @classmethod
    def restored(cls, saved: dict[str, Any]) -> LogWindow:
        distill, z_loss = saved.get("distill"), saved.get("z_loss")
        return cls(
            loss=float(saved.get("loss", 0.0)),
            steps=int(saved.get("steps", 0)),
            distill=[float(v) for v in distill] if distill is not None else None,
            distill_steps=int(saved.get("distill_steps", 0)),
            z_loss=[float(v) for v in z_loss] if z_loss is not None else None,
            z_steps=int(saved.get("z_steps", 0)),
        )


def metrics_record(job: Job, progress: Progress, window: LogWindow, loss_step: float, lr: float) -> dict[str, Any]:
    """One line of metrics.jsonl: ``loss`` is the mean over the steps since the previous line (as
    every peer logs it), ``loss_step`` this step's; times and throughput are window means too. With
    distill, ``ce_loss``, ``kd_loss`` and ``teacher_ce`` are window means like ``loss``; with z-loss,
    ``ce_loss`` and ``z_loss`` (the mean log(Z)^2 without the coefficient, so ``loss = ce_loss +
    optim.z_loss * z_loss``, and with distill too ``(1 - alpha) * ce_loss + alpha * kd_loss + ...``)."""
    engine, spec = job.engine, job.spec
    tokens_per_s = window.tokens / window.time
    tflops = spec.model.flops_per_token(spec.data.seq_len) * tokens_per_s / job.env.world_size / 1e12
    peak = peak_tflops(torch.cuda.get_device_name(job.env.local_rank)) if torch.cuda.is_available() else None
    grad_norm = engine.get_global_grad_norm()
    stats = job.train_loader.stats()
    record = {
        "step": progress.step,
        "loss": window.loss / window.steps,
        "loss_step": loss_step,
        "lr": lr,
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "tokens": progress.tokens,
        "tokens_per_s": tokens_per_s,
        "step_time_s": window.time / window.timed,
        "data_wait_s": window.data / window.timed,
        "tflops": tflops,
        "mfu": tflops / peak if peak else None,
        "mem_gb": memory_gb(),
        "loss_scale": getattr(engine.optimizer, "cur_scale", None) if spec.precision == "fp16" else None,
        "skipped_steps": engine.skipped_steps,
        "bad_shards": stats["bad_shards"],
    }
    if window.distill is not None:
        ce, kd, teacher_ce = (total / window.distill_steps for total in window.distill)
        record |= {"ce_loss": ce, "kd_loss": kd, "teacher_ce": teacher_ce}
        # this rank's, as step_time_s is
        record |= {"teacher_time_s": window.teacher / window.timed, "teacher_share": window.teacher / window.time}
    if window.z_loss is not None:
        ce, z = (total / window.z_steps for total in window.z_loss)
        record |= {"ce_loss": ce, "z_loss": z}  # with distill too: the same ce_loss
    if job.guard is not None:
        record |= job.guard.metrics()
    if len(stats["source_tokens"]) > 1:
        # the mixture as realised by this rank's readers (token shares per source, in data.train's
        # order), next to the weights asked for: with data.on_error=skip, lost shards show here
        total = max(sum(stats["source_tokens"]), 1)
        record["source_shares"] = [t / total for t in stats["source_tokens"]]
    return record | stragglers(window)


def stragglers(window: LogWindow) -> dict[str, Any]:
    """The slowest rank over the window against the median rank: one small all-gather of each rank's
    mean busy time (step time less backward) and data wait.

    Busy, not step time: a slow rank holds the others up in the backward pass, where the gradients are
    reduced, so every rank's step takes about as long; the one with the least waiting, the most busy
    time, is the one the others waited for. Host clocks on GPUs time kernel launches, so this names
    ranks slow in data loading or host code, and GPUs only as far as their launches stall.
    """
    busy, data = (window.time - window.backward) / window.timed, window.data / window.timed
    mine = torch.tensor([busy, data], dtype=torch.float64)
    ranks = [mine]
    if dist.get_world_size() > 1:
        mine = mine.to(distributed.device_of_backend())
        ranks = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(ranks, mine)
    busy, data = zip(*(r.cpu().tolist() for r in ranks))
    slowest = max(range(len(busy)), key=busy.__getitem__)
    return {
        "slowest_rank": slowest,
        "slowest_busy_s": busy[slowest],
        "median_busy_s": statistics.median(busy),
        "slowest_data_wait_s": data[slowest],
        "median_data_wait_s": statistics.median(data),
    }


def _first_batches(loader: Any, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Up to ``n`` micro-batches; the loader is closed afterwards, so no worker process outlives them."""
    try:
        return list(islice(iter(loader), n))
    finally:
        loader.close()


@torch.no_grad()
def evaluate(job: Job) -> dict[str | None, float]:
    """Mean validation loss per val set over up to ``train.eval_batches`` micro-batches per rank; empty
    without data.

    Keys as in ``job.val_loaders``. With named sources, key None is added: their token-weighted mean
    (every micro-batch holds the same number of tokens, so a source weighs by the batches it was
    evaluated on). Every rank runs the same number of forward passes per set (ZeRO-3 gathers
    parameters collectively): a set is cut to its shortest rank, and left out on all if one has none.
    """
    names = list(job.val_loaders)
    batches = [_first_batches(loader, job.spec.train.eval_batches) for loader in job.val_loaders.values()]
    if not batches:
        return {}
    n = torch.tensor([len(b) for b in batches], dtype=torch.int64)
    if dist.get_world_size() > 1:
        n = n.to(distributed.device_of_backend())
        dist.all_reduce(n, op=dist.ReduceOp.MIN)
    common = n.tolist()
    if not any(common):
        return {}
    job.engine.eval()
    parts = []
    for set_batches, n_common in zip(batches, common):
        total = torch.zeros((), dtype=torch.float64, device=job.device)
        for x, y in set_batches[:n_common]:
            x = x.to(job.device)
            total += job.engine(x, y.to(job.device), documents=job.documents(x)).double()
        parts += [total, total.new_tensor(float(n_common))]
    job.engine.train()
    reduced = all_reduce_sum(torch.stack(parts))
    sums, counts = reduced[0::2], reduced[1::2]
    losses = {name: total / count for name, total, count in zip(names, sums, counts) if count > 0}
    if None not in losses:
        losses[None] = sum(sums) / sum(counts)
    return losses


def val_key(name: str | None) -> str:
    """The metric of a val set: ``val_loss``, or ``val_loss/<name>`` for a named source."""
    return "val_loss" if name is None else f"val_loss/{name}"


def log_eval(metrics: MetricsLogger, step: int, losses: dict[str | None, float]) -> None:
    if not losses:
        return
    record: dict[str, Any] = {"step": step}
    for name, loss in sorted(losses.items(), key=lambda item: item[0] is not None):
        record[val_key(name)] = loss
        record[val_key(name).replace("val_loss", "val_ppl", 1)] = math.exp(min(loss, 50))
    metrics.log(record)


def due(step: int, every: int) -> bool:
    """Whether a cadence of ``every`` steps (0: never) falls on ``step``."""
    return every > 0 and step % every == 0


@dataclass
class SaveClock:
    """When the last checkpoint was written: for ``checkpoint.every_minutes`` and the save at the end."""

    step: int
    time: float = field(default_factory=time.monotonic)

    def mark(self, step: int) -> None:
        self.step, self.time = step, time.monotonic()

    def minutes_due(self, minutes: float) -> bool:
        return minutes > 0 and time.monotonic() - self.time >= 60 * minutes


def reduce_step(
    job: Job, result: StepResult, stop: distributed.StopRequest, saved: SaveClock
) -> tuple[list[float], float | None, bool, bool]:
    """The step's one collective: (global means of ``result.losses``, rank 0's ``result.grad_norm``,
    whether any rank must stop, whether any rank's save clock ran out). Every rank gets the same
    answer, so all stop, save or judge a step alike."""
    flags = [float(stop.requested), float(saved.minutes_due(job.spec.checkpoint.every_minutes))]
    held = [result.grad_norm] if result.grad_norm is not None else []
    votes = torch.cat([result.losses, *held, torch.tensor(flags, dtype=torch.float64).to(job.device)])
    *sums, stop_votes, time_votes = all_reduce_sum(votes)
    grad_norm = sums.pop() if held else None
    return [total / job.env.world_size for total in sums], grad_norm, stop_votes > 0, time_votes > 0


def fit(
    job: Job,
    progress: Progress,
    window: LogWindow,
    stop: distributed.StopRequest,
    metrics: MetricsLogger,
    beat: Heartbeat,
) -> int:
    """Train from ``progress`` to the last step; returns the exit code."""
    spec, total = job.spec, job.total_steps
    bar = ProgressBar(job, progress)
    batches = iter(job.train_loader)
    saved = SaveClock(progress.step)
    parts = loss_parts(spec)
    while progress.step < total:
        beat.step(progress.step + 1)
        lr = lr_at(progress.step, total, spec.optim, spec.schedule)
        t_step = time.perf_counter()
        result = train_step(job, batches, lr, beat)
        beat.mark("sync")
        losses, grad_norm, stopping, save_due = reduce_step(job, result, stop, saved)
        loss = losses[0]
        if job.guard is not None:
            decision = judge_update(job, progress.step + 1, loss, grad_norm, beat)
            if decision.verdict is Verdict.REWIND:
                try:
                    progress, window = rewind(job, decision.first_spike, metrics, beat)
                except StabilityStop as exc:
                    log.error("%s", exc)
                    return EXIT_ERROR
                batches, saved = iter(job.train_loader), SaveClock(progress.step)
            if decision.verdict is not Verdict.APPLY:
                continue  # not a step: its number, lr and data budget go to the next one
        elif not math.isfinite(loss):
            log.error("step %d: loss is %s; stopping (lower optim.lr or use bf16)", progress.step + 1, loss)
            return EXIT_ERROR
        progress.step += 1
        progress.tokens += job.tokens_per_step
        window.add(losses, time.perf_counter() - t_step, result, job.tokens_per_step, parts)
        if due(progress.step, spec.train.log_every) or progress.step == total:
            metrics.log(metrics_record(job, progress, window, loss, lr))
            window = LogWindow()
        bar.update(loss)
        if stopping:
            stop.acknowledge()  # from here the rank saves and leaves: no grace deadline
        elif due(progress.step, spec.train.eval_every) and progress.step < total:
            beat.mark("eval")
            log_eval(metrics, progress.step, evaluate(job))
        if stopping or save_due or due(progress.step, spec.checkpoint.every_steps):
            beat.mark("save")
            save_checkpoint(job, progress, window)
            saved.mark(progress.step)
        if stopping:
            job.saver.wait()  # the requeued job must find this checkpoint committed
            log.warning(
                "stop requested (%s): checkpointed at step %d, exiting with %d so the launcher requeues",
                stop.signal_name or "another rank",
                progress.step,
                EXIT_REQUEUE,
            )
            return EXIT_REQUEUE
    bar.close()
    return finish(job, progress, window, metrics, saved, beat)


def judge_update(job: Job, step: int, loss: float, grad_norm: float | None, beat: Heartbeat) -> Decision:
    """Apply the held update of step ``step``, or skip it (a spike, or one that calls for a rewind)."""
    assert job.guard is not None and grad_norm is not None
    decision = job.guard.judge(step, loss, grad_norm)
    beat.mark("optimizer")
    if decision.verdict is Verdict.APPLY:
        job.engine.step()
        return decision
    held_update.skip(job.engine)
    what = "spike skipped" if decision.verdict is Verdict.SKIP else "update skipped, rewinding"
    log.warning("step %d: %s (%s): loss %.6g, grad norm %.6g", step, what, decision.why, loss, grad_norm)
    return decision


def rewind(job: Job, first_spike: int, metrics: MetricsLogger, beat: Heartbeat) -> tuple[Progress, LogWindow]:
    """Collective. Go back to the last complete checkpoint before step ``first_spike``: later
    checkpoints are moved to ``checkpoints/rewound/rewind-N/``, the rewind recorded
    (``bigtx.stability.RewindRecord``), the checkpoint restored as on resume (which skips
    ``stability.skip_batches`` of data after it) and the metrics cut back to its step. Raises
    ``StabilityStop`` when no checkpoint or no rewind is left."""
    guard, ckpt_root = job.guard, Path(job.spec.run.dir) / "checkpoints"
    assert guard is not None
    beat.mark("startup")
    # a save still in flight (checkpoint.async) must be committed, or fail, before the checkpoints are looked at
    job.saver.wait()
    before = [p for p in checkpoint.complete_checkpoints(ckpt_root) if checkpoint.step_of(p) < first_spike]
    guard.check_rewind(first_spike, checkpoint.step_of(before[0]) if before else None)
    target = before[0]
    record = RewindRecord.after(guard, target, read_record(ckpt_root))
    if job.env.is_main:
        aside = ckpt_root / "rewound" / f"rewind-{record.rewinds}"
        for path in checkpoint.set_aside_after(ckpt_root, checkpoint.step_of(target), aside):
            log.info("rewind: moved %s (after the spikes) to %s", path.name, aside)
        write_record(ckpt_root, record)
    dist.barrier()
    log.warning("rewind %d of %d: back to %s", record.rewinds, guard.cfg.max_rewinds, target)
    progress, window = restore(job, ResumePlan(checkpoint=target, meta=checkpoint.read_meta(target)))
    metrics.cut_back(progress.step)
    return progress, window


def finish(
    job: Job, progress: Progress, window: LogWindow, metrics: MetricsLogger, saved: SaveClock, beat: Heartbeat
) -> int:
    """After the last step: final evaluation, final checkpoint, the FINISHED marker."""
    run_dir = Path(job.spec.run.dir)
    beat.mark("eval")
    losses = evaluate(job)
    log_eval(metrics, progress.step, losses)
    for name, loss in losses.items():
        on = "" if name is None else f" on {name}"
        log.info("final validation loss%s %.4f (perplexity %.2f)", on, loss, math.exp(min(loss, 50)))
    if job.spec.checkpoint.save_at_end and saved.step != progress.step:
        beat.mark("save")
        save_checkpoint(job, progress, window)
    job.saver.wait()  # FINISHED comes after the last checkpoint's commit
    if job.env.is_main:
        (run_dir / FINISHED).write_text(f"step {progress.step}\n")
        tb = run_dir / "tb"
        log.info("finished at step %d; TensorBoard: tensorboard --logdir %s --host 127.0.0.1", progress.step, tb)
    return EXIT_FINISHED


class ProgressBar:
    """tqdm on rank 0 when ``train.progress_bar``; does nothing otherwise."""

    def __init__(self, job: Job, progress: Progress) -> None:
        self._bar = None
        if job.env.is_main and job.spec.train.progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(
                total=job.total_steps, initial=progress.step, unit="step", dynamic_ncols=True, mininterval=1.0
            )

    def update(self, loss: float) -> None:
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# --------------------------------------------------------------------------------------------
# The run.


def train(spec: RunSpec, env: DistEnv, ds_config: dict[str, Any]) -> int:
    """Run the job under this rank's heartbeat and hang watchdog (``bigtx.heartbeat``); returns the exit code."""
    # the dump must come before a peer's collective timeout ends the job
    limits = heartbeat.Limits(spec.watchdog.factor, spec.watchdog.floor_s, distributed.timeout().total_seconds() / 2)
    # SLURM's node name is what `scontrol` and `sbatch --exclude` take; hosts can be named otherwise
    host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    with Heartbeat(Path(spec.run.dir), env.rank, env.world_size, host, limits) as beat:
        return run(spec, env, ds_config, beat)


def run(spec: RunSpec, env: DistEnv, ds_config: dict[str, Any], beat: Heartbeat) -> int:
    """Start the process group, plan the resume, build, restore and fit; returns the exit code."""
    run_dir = Path(spec.run.dir)
    stop = distributed.StopRequest(lifetime.stop_grace())
    setup_logging(run_dir, env, spec.deepspeed.log_level)
    distributed.init(env)
    if spec.precision == "fp16" and distributed.allow_emulated_fp16():
        log.warning("this CPU has no native fp16 kernels: fp16 runs emulated (slow)")
    if spec.precision == "bf16" and not distributed.fast_bf16():
        log.warning(
            "this CPU has no bf16 matrix kernels (oneDNN needs AVX-512): bf16 matmuls run many times slower "
            "than fp32 here; set precision: fp32 for runs on this machine"
        )
    hosts: list[Any] = [None] * env.world_size
    dist.all_gather_object(hosts, socket.gethostname())

    total = spec.total_steps(env.world_size)
    plan = plan_resume(run_dir, spec_to_dict(spec), world_size=env.world_size, total_steps=total, is_main=env.is_main)
    if plan.finished:
        return EXIT_FINISHED
    if plan.reshard:
        ds_config = derive_deepspeed_config(spec, env.world_size, load_universal=True)
    job = build(spec, env, ds_config, plan)
    try:
        progress, window = restore(job, plan) if plan.checkpoint is not None else (Progress(), LogWindow())
        if env.is_main:
            announce(job, ds_config, hosts, progress)
        metrics = open_metrics(job, progress)
        try:
            return fit(job, progress, window, stop, metrics, beat)
        finally:
            metrics.close()
    finally:
        job.close()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bigtx train", description="Train a model from a run spec.")
    add_spec_args(parser)
    # the deepspeed launcher appends --local_rank=N; the environment already says the same
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code (0 finished, 2 bad input, 75 requeue, 1 error,
    143 stop signal without reaching a step boundary)."""
    args = parse_args(argv)
    env = distributed.detect()
    try:
        spec = load_spec(args.spec, args.overrides)
        ds_config = preflight(spec, env)
    except SpecError as exc:
        print(f"bigtx: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (DataError, ValueError) as exc:
        print(f"bigtx: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return train(spec, env, ds_config)
    except (SpecError, checkpoint.CheckpointError, DataError) as exc:
        print(f"bigtx rank {env.rank}: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except Exception:
        # print this rank's error before the others notice and the launcher stops the job
        print(f"bigtx rank {env.rank}: unhandled error:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        return EXIT_ERROR


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # skip interpreter teardown: a peer that died mid-collective must not make this rank hang in atexit
    os._exit(code)

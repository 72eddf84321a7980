"""The main job: ``bigtx train SPEC`` (also ``python -m bigtx.train SPEC`` and ``deepspeed -m bigtx.train SPEC``).

Read top to bottom: check everything that can be checked before a process group exists, build
spec -> process group -> model -> DeepSpeed engine -> data, resume if there is a checkpoint, then
the loop: step, log, evaluate, checkpoint, stop.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import resource
import socket
import sys
import time
import traceback
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml

import bigtx
from bigtx import checkpoint, distributed
from bigtx.checkpoint.resume import find_resume_point, prepare_run_dir
from bigtx.config import RunSpec, SpecError, add_spec_args, load_spec, spec_hash, spec_to_dict
from bigtx.config.deepspeed_config import derive_deepspeed_config
from bigtx.data import DataError, build_loader, check_data
from bigtx.distributed import EXIT_ERROR, EXIT_FINISHED, EXIT_REQUEUE, EXIT_USAGE, DistEnv
from bigtx.metrics import MetricsLogger, peak_tflops
from bigtx.model import Transformer
from bigtx.optim import lr_at, param_groups

log = logging.getLogger("bigtx")


@dataclass
class Progress:
    """What the loop has done so far; saved in every checkpoint."""

    step: int = 0
    tokens: int = 0


# --------------------------------------------------------------------------------------------
# Before the process group: every check that does not need other ranks.


def preflight(spec: RunSpec, env: DistEnv) -> dict[str, Any]:
    """Validate what depends on the world size and the data; returns the DeepSpeed config.

    Raises ``SpecError``/``DataError``/``ValueError`` with a message naming the field.
    """
    try:
        ds_config = derive_deepspeed_config(spec, env.world_size)
    except ValueError as exc:
        raise SpecError([str(exc)]) from None
    if spec.data.train is None:
        raise SpecError(["data.train: no training data; give a `bigtx data build` directory or shard pattern"])
    check_data(spec.data, spec.model.vocab_size)
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


def all_reduce_sum(values: list[float]) -> list[float]:
    """One collective for several scalars (a CPU-GPU sync point on GPUs)."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_world_size() > 1:
        t = t.to(distributed.device_of_backend())
        dist.all_reduce(t)
    return t.cpu().tolist()


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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


@torch.no_grad()
def evaluate(engine: Any, val_loader: Any, n_batches: int, device: torch.device) -> float | None:
    """Mean validation loss over up to ``n_batches`` micro-batches per rank, or None without data.

    Every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively).
    """
    batches = list(islice(iter(val_loader), n_batches)) if val_loader is not None else []
    n = torch.tensor([len(batches)], dtype=torch.int64)
    if dist.get_world_size() > 1:
        n = n.to(distributed.device_of_backend())
        dist.all_reduce(n, op=dist.ReduceOp.MIN)
    n_common = int(n.item())
    if n_common == 0:
        return None
    engine.eval()
    total = 0.0
    for x, y in batches[:n_common]:
        total += engine(x.to(device), y.to(device)).float().item()
    engine.train()
    summed, count = all_reduce_sum([total, float(n_common)])
    return summed / count


def save_checkpoint(
    engine: Any, spec: RunSpec, env: DistEnv, progress: Progress, train_loader: Any, group_names: list[list[str]]
) -> Path:
    ckpt_root = Path(spec.run.dir) / "checkpoints"
    rank_state = {"loader": train_loader.state_dict(), "rng": rng_state(), "rank": env.rank}
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
        "param_groups": group_names,
    }
    t0 = time.perf_counter()
    path = checkpoint.save(engine, ckpt_root, progress.step, rank_state, meta)
    if env.is_main:
        for old in checkpoint.apply_retention(ckpt_root, spec.checkpoint.keep_last, spec.checkpoint.keep_every):
            log.info("retention: removed %s", old.name)
    log.info("saved checkpoint %s in %.1fs", path, time.perf_counter() - t0)
    return path


def needs_universal(meta: dict[str, Any], spec: RunSpec, env: DistEnv) -> bool:
    """Whether the checkpoint's ZeRO partitions must be re-sharded to load here.

    ZeRO-0 keeps the whole optimizer state on every rank, so it loads at any world size as it is.
    """
    same_stage = meta["zero_stage"] == spec.zero.stage
    return not (same_stage and (meta["world_size"] == env.world_size or spec.zero.stage == 0))


def resume(engine: Any, path: Path, spec: RunSpec, env: DistEnv, train_loader: Any) -> Progress:
    """Load engine, data position and RNG state of ``path``; re-shard through the universal format
    when the world size or ZeRO stage changed."""
    meta = checkpoint.read_meta(path)
    source = path.parent / "universal" / path.name if needs_universal(meta, spec, env) else path
    engine.load_checkpoint(str(source.parent), tag=source.name, load_lr_scheduler_states=False)
    if meta["world_size"] == env.world_size:
        state = torch.load(checkpoint.rank_file(path, env.rank), weights_only=False)
        train_loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
    else:
        old_states = [
            torch.load(checkpoint.rank_file(path, r), weights_only=False)["loader"] for r in range(meta["world_size"])
        ]
        train_loader.load_resharded_state(old_states)
        seed_everything(spec.run.seed + meta["step"], env.rank)
    log.info("resumed from %s at step %d (%d tokens seen)", path, meta["step"], meta["tokens"])
    return Progress(step=meta["step"], tokens=meta["tokens"])


def check_resume_spec(path: Path, spec: RunSpec, env: DistEnv) -> bool:
    """Refuse spec changes that break continuation; True when re-sharding is needed."""
    meta = checkpoint.read_meta(path)
    warnings, refusals = checkpoint.spec_changes(meta["spec"], spec_to_dict(spec))
    if refusals:
        raise SpecError(
            [f"{line}  (cannot change when resuming from {path})" for line in refusals]
            + ["fix: restore these fields, or start a new run (new run.dir, or checkpoint.resume=none)"]
        )
    for line in warnings:
        log.warning("spec changed since the checkpoint: %s", line)
    if meta["world_size"] != env.world_size:
        log.warning(
            "checkpoint %s was written by %d rank(s); this run has %d", path, meta["world_size"], env.world_size
        )
    reshard = needs_universal(meta, spec, env)
    if reshard:
        if meta["zero_stage"] == 0:
            raise SpecError(
                [
                    f"zero.stage: {path} was written at ZeRO-0, which cannot be re-sharded to ZeRO-"
                    f"{spec.zero.stage}; resume at zero.stage=0"
                ]
            )
        log.warning(
            "re-sharding through DeepSpeed's universal checkpoint format (ZeRO-%d x %d ranks -> ZeRO-%d x %d)",
            meta["zero_stage"],
            meta["world_size"],
            spec.zero.stage,
            env.world_size,
        )
    return reshard


def write_run_files(run_dir: Path, spec: RunSpec, ds_config: dict[str, Any], env: DistEnv, hosts: list[str]) -> None:
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


# --------------------------------------------------------------------------------------------
# The run.


def train(spec: RunSpec, env: DistEnv, ds_config: dict[str, Any]) -> int:
    import deepspeed

    run_dir = Path(spec.run.dir)
    ckpt_root = run_dir / "checkpoints"
    setup_logging(run_dir, env, spec.deepspeed.log_level)
    distributed.init(env)
    device = distributed.device(env)
    if spec.precision == "fp16" and distributed.allow_emulated_fp16():
        log.warning("this CPU has no native fp16 kernels: fp16 runs emulated (slow); bf16 is the fast choice here")
    hosts: list[Any] = [None] * env.world_size
    dist.all_gather_object(hosts, socket.gethostname())

    finished = run_dir / "FINISHED"
    if finished.exists() and spec.checkpoint.resume == "auto":
        done = int(finished.read_text().split()[1])
        if done >= spec.total_steps(env.world_size):
            log.info("%s is marked FINISHED at step %d; nothing to do", run_dir, done)
            return EXIT_FINISHED
        log.info("%s finished at step %d; continuing to step %d", run_dir, done, spec.total_steps(env.world_size))
    # every rank checks (so all refuse alike); only rank 0 deletes
    prepare_run_dir(run_dir, spec.checkpoint.resume, spec.checkpoint.overwrite, env.is_main)
    dist.barrier()
    if env.is_main:
        finished.unlink(missing_ok=True)
    start = find_resume_point(ckpt_root, spec.checkpoint.resume, env.is_main)
    reshard = check_resume_spec(start, spec, env) if start else False
    if reshard:
        if env.is_main:
            checkpoint.to_universal(start)
        dist.barrier()
        ds_config = derive_deepspeed_config(spec, env.world_size, load_universal=True)

    # Model: identical initial weights on every rank, from run.seed.
    seed_everything(spec.run.seed, env.rank)
    model = Transformer(spec.model)
    model.init_weights(spec.run.seed)
    if spec.model.init_from and start is None:
        from bigtx.model.weights import load_weights

        load_weights(model, spec.model.init_from)
        log.info("initialised weights from %s", spec.model.init_from)
    checkpoint.mark_universal_capable(model)

    groups = param_groups(model, spec.optim)
    names = {id(p): name for name, p in model.named_parameters()}
    group_names = [[names[id(p)] for p in group["params"]] for group in groups]
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    micro, accum, global_batch = spec.batch_sizes(env.world_size)
    tokens_per_step = global_batch * spec.data.seq_len
    total_steps = spec.total_steps(env.world_size)

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
        val_loader = build_loader(spec.data, split="val", **loader_args)
    except DataError as exc:
        log.warning("no validation: %s", exc)
        val_loader = None

    progress = resume(engine, start, spec, env, train_loader) if start else Progress()
    if env.is_main:
        write_run_files(run_dir, spec, ds_config, env, hosts)
        log.info(
            "training %s: %s parameters, %d rank(s), ZeRO-%d, %s, global batch %d x %d tokens, steps %d -> %d",
            spec.run.name,
            f"{spec.model.num_params():,}",
            env.world_size,
            spec.zero.stage,
            spec.precision,
            global_batch,
            spec.data.seq_len,
            progress.step,
            total_steps,
        )
    metrics = MetricsLogger(run_dir, env.is_main, progress.step)
    if progress.step == 0:
        metrics.log_spec(
            spec_to_dict(spec),
            {
                "params": spec.model.num_params(),
                "world_size": env.world_size,
                "precision": spec.precision,
                "zero_stage": spec.zero.stage,
                "lr": spec.optim.lr,
                "global_batch": global_batch,
            },
        )
    stop = distributed.StopRequest()
    bar = None
    if env.is_main and spec.train.progress_bar:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=progress.step, unit="step", dynamic_ncols=True, mininterval=1.0)

    flops_per_token = spec.model.flops_per_token(spec.data.seq_len)
    peak = peak_tflops(torch.cuda.get_device_name(env.local_rank)) if torch.cuda.is_available() else None
    batches: Iterator = iter(train_loader)
    last_save_time = time.monotonic()
    last_saved_step = progress.step if start else -1
    window = {"time": 0.0, "data": 0.0, "tokens": 0, "steps": 0}

    while progress.step < total_steps:
        # ---- one optimizer step: accum micro-batches; DeepSpeed accumulates and clips
        lr = lr_at(progress.step, total_steps, spec.optim, spec.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t_step = time.perf_counter()
        data_wait, loss_sum = 0.0, 0.0
        for _ in range(accum):
            t_data = time.perf_counter()
            x, y = next(batches)
            data_wait += time.perf_counter() - t_data
            loss = engine(x.to(device), y.to(device))
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().float().item()
        progress.step += 1
        progress.tokens += tokens_per_step

        # ---- one collective per step: the global mean loss, and whether any rank must stop or save
        minutes_due = (
            spec.checkpoint.every_minutes and time.monotonic() - last_save_time >= 60 * spec.checkpoint.every_minutes
        )
        loss_total, stop_votes, time_votes = all_reduce_sum(
            [loss_sum / accum, float(stop.requested), float(bool(minutes_due))]
        )
        loss_mean = loss_total / env.world_size
        step_time = time.perf_counter() - t_step
        window["time"] += step_time
        window["data"] += data_wait
        window["tokens"] += tokens_per_step
        window["steps"] += 1
        if not math.isfinite(loss_mean):
            log.error("step %d: loss is %s; stopping (lower optim.lr or use bf16)", progress.step, loss_mean)
            return EXIT_ERROR

        if progress.step % spec.train.log_every == 0 or progress.step == total_steps:
            tokens_per_s = window["tokens"] / window["time"]
            tflops = flops_per_token * tokens_per_s / env.world_size / 1e12
            grad_norm = engine.get_global_grad_norm()
            record = {
                "step": progress.step,
                "loss": loss_mean,
                "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tokens": progress.tokens,
                "tokens_per_s": tokens_per_s,
                "step_time_s": window["time"] / window["steps"],
                "data_wait_s": window["data"] / window["steps"],
                "tflops": tflops,
                "mfu": tflops / peak if peak else None,
                "mem_gb": memory_gb(),
                "loss_scale": getattr(engine.optimizer, "cur_scale", None) if spec.precision == "fp16" else None,
                "skipped_steps": engine.skipped_steps,
                "bad_shards": train_loader.stats()["bad_shards"],
            }
            metrics.log(record)
            window = {"time": 0.0, "data": 0.0, "tokens": 0, "steps": 0}
        if bar is not None:
            bar.set_postfix(loss=f"{loss_mean:.3f}", tok_s=f"{tokens_per_step / step_time:,.0f}", refresh=False)
            bar.update(1)

        if spec.train.eval_every and progress.step % spec.train.eval_every == 0 and progress.step < total_steps:
            val_loss = evaluate(engine, val_loader, spec.train.eval_batches, device)
            if val_loss is not None:
                metrics.log({"step": progress.step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))})

        stopping = stop_votes > 0
        every = spec.checkpoint.every_steps
        if stopping or time_votes > 0 or (every and progress.step % every == 0):
            save_checkpoint(engine, spec, env, progress, train_loader, group_names)
            last_save_time, last_saved_step = time.monotonic(), progress.step
        if stopping:
            log.warning(
                "stop requested (%s): checkpointed at step %d, exiting with %d so the launcher requeues",
                stop.signal_name or "another rank",
                progress.step,
                EXIT_REQUEUE,
            )
            metrics.close()
            return EXIT_REQUEUE

    if bar is not None:
        bar.close()
    val_loss = evaluate(engine, val_loader, spec.train.eval_batches, device)
    if val_loss is not None:
        metrics.log({"step": progress.step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))})
        log.info("final validation loss %.4f (perplexity %.2f)", val_loss, math.exp(min(val_loss, 50)))
    if spec.checkpoint.save_at_end and last_saved_step != progress.step:
        save_checkpoint(engine, spec, env, progress, train_loader, group_names)
    metrics.close()
    if env.is_main:
        (run_dir / "FINISHED").write_text(f"step {progress.step}\n")
        log.info(
            "finished at step %d; TensorBoard: tensorboard --logdir %s --host 127.0.0.1", progress.step, run_dir / "tb"
        )
    return EXIT_FINISHED


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bigtx train", description="Train a model from a run spec.")
    add_spec_args(parser)
    # the deepspeed launcher appends --local_rank=N; the environment already says the same
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code (0 finished, 2 bad input, 75 requeue, 1 error)."""
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

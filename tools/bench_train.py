"""Step time of `bigtx train` against a plain PyTorch DDP loop: same model, batch, ranks, precision.

    python tools/bench_train.py [--steps 40] [--stages 0 2 3] [--out bench_results/bench_train.json]
    python tools/bench_train.py --watch-cost [--stages 2] [--repeats 3]
    python tools/bench_train.py --against DIR [--stages 3] [--repeats 4]
    python tools/bench_train.py --document-mask [--stages 2] [--repeats 3]

Every side runs on 2 local gloo ranks, one after the other, alternating, `--repeats` times:

* DDP: a hand-written DistributedDataParallel + torch AdamW loop over in-memory batches;
* DeepSpeed: the same loop on a bare DeepSpeed engine with the config bigtx derives (no bigtx
  loader, metrics or checkpoint logic), to show where the time goes;
* bigtx: `bigtx train`, median `step_time_s` from `metrics.jsonl` (its loader, metrics and the
  per-step loss/stop all-reduce included).

bigtx/DDP is the overhead the issue asks about; bigtx/DeepSpeed is what bigtx itself adds.

``--watch-cost`` instead compares `bigtx train` with itself less the hang and straggler machinery
(``bigtx.heartbeat``'s heartbeat and watchdog thread, the per-log-step all-gather), both with
``train.log_every=1`` (a gather every step, the worst case), alternating. Its time per step is the
interval between consecutive steps' starts on rank 0, so it includes the logging and the gather
that ``step_time_s`` leaves out.

``--against DIR`` instead compares `bigtx train` of this checkout with that of another one (e.g. a
git worktree of an older commit, run with the same interpreter), alternating, same shards.

``--document-mask`` instead compares `bigtx train` with ``data.document_mask`` on against off,
alternating, same shards. On the CPU the mask path is SDPA with an explicit [B, 1, T, T] mask: every
query-key pair of a row is computed (the causal kernel skips the upper triangle), whatever the number
of documents, so the cost does not depend on how many boundaries the rows hold.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from bare_engine import deepspeed_engine
from local_ranks import spawn_local

MODEL = [
    "model.d_model=256",
    "model.n_layers=4",
    "model.n_heads=8",
    "model.n_kv_heads=4",
    "model.d_ff=688",
    "model.max_seq_len=256",
    "data.seq_len=256",
    "train.micro_batch_size=4",
    "train.grad_accum=1",
]
WARMUP = 5


def ddp_worker(steps: int, precision: str, out: Path) -> None:
    """One rank of the reference loop: DDP + torch AdamW + autocast, random tokens."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from bigtx.config import load_spec
    from bigtx.model import Transformer

    spec = load_spec("tiny", MODEL + ["model.vocab_size=320"])
    dist.init_process_group("gloo")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    model = Transformer(spec.model)
    model.init_weights(spec.run.seed)
    ddp = DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    gen = torch.Generator().manual_seed(dist.get_rank())
    tokens = torch.randint(0, 256, (steps, 4, 257), generator=gen)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        x, y = tokens[i, :, :-1], tokens[i, :, 1:]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = ddp(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_all = loss.detach().clone()
        dist.all_reduce(loss_all)  # bigtx reduces the loss every step too
        loss_all.item()
        times.append(time.perf_counter() - t0)
    if dist.get_rank() == 0:
        out.write_text(json.dumps(times))
    dist.destroy_process_group()


def deepspeed_worker(steps: int, precision: str, stage: int, out: Path) -> None:
    """One rank of a bare DeepSpeed loop with bigtx's derived config, random tokens."""
    import torch
    import torch.distributed as dist

    from bigtx.config import load_spec

    spec = load_spec("tiny", MODEL + ["model.vocab_size=320", f"precision={precision}", f"zero.stage={stage}"])
    engine = deepspeed_engine(spec, threads=max(1, (os.cpu_count() or 1) // int(os.environ["WORLD_SIZE"])))
    gen = torch.Generator().manual_seed(dist.get_rank())
    tokens = torch.randint(0, 256, (steps, 4, 257), generator=gen)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        loss = engine(tokens[i, :, :-1], tokens[i, :, 1:])
        engine.backward(loss)
        engine.step()
        loss_all = loss.detach().float().clone()
        dist.all_reduce(loss_all)
        loss_all.item()
        times.append(time.perf_counter() - t0)
    if dist.get_rank() == 0:
        out.write_text(json.dumps(times))


def run_deepspeed(steps: int, precision: str, stage: int, work: Path) -> float:
    out = work / f"ds{stage}.json"
    cmd = [sys.executable, __file__, "--ds-worker", str(steps), precision, str(stage), str(out)]
    procs = spawn_local(cmd, 2, {"PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert all(p.wait() == 0 for p in procs), "DeepSpeed worker failed"
    return statistics.median(json.loads(out.read_text())[WARMUP:])


def run_ddp(steps: int, precision: str, work: Path) -> float:
    out = work / "ddp.json"
    cmd = [sys.executable, __file__, "--ddp-worker", str(steps), precision, str(out)]
    procs = spawn_local(cmd, 2, {"PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert all(p.wait() == 0 for p in procs), "DDP worker failed"
    return statistics.median(json.loads(out.read_text())[WARMUP:])


def bigtx_overrides(run_dir: Path, shards: Path, steps: int, precision: str, stage: int) -> list[str]:
    return MODEL + [
        f"run.dir={run_dir}",
        f"data.train={shards}",
        f"train.max_steps={steps}",
        f"precision={precision}",
        f"zero.stage={stage}",
        "train.log_every=1",
        "train.eval_every=0",
        "checkpoint.every_steps=0",
        "checkpoint.save_at_end=false",
        "train.progress_bar=false",
        "schedule.warmup_steps=2",
    ]


def run_bigtx(
    steps: int,
    precision: str,
    stage: int,
    shards: Path,
    work: Path,
    checkout: Path | None = None,
    extra: tuple[str, ...] = (),
) -> float:
    """Median step time of `bigtx train` from this checkout, or from ``checkout``, with ``extra`` overrides."""
    run_dir = work / f"bigtx-z{stage}-{time.monotonic_ns()}"
    overrides = bigtx_overrides(run_dir, shards, steps, precision, stage) + list(extra)
    cmd = [sys.executable, "-m", "bigtx.train", "tiny", *(f"--set={o}" for o in overrides)]
    env = {"BIGTX_DIST_TIMEOUT_S": "120"} | ({"PYTHONPATH": str(checkout)} if checkout else {})
    procs = spawn_local(cmd, 2, env, cwd=checkout)
    assert all(p.wait() == 0 for p in procs), "bigtx train failed"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["step_time_s"] for r in records if "loss" in r and r["step"] > WARMUP)


class Unwatched:
    """``bigtx.heartbeat.Heartbeat`` doing nothing: no file, no thread, no watchdog."""

    def __init__(self, *args: object) -> None:
        pass

    def __enter__(self) -> Unwatched:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def step(self, step: int) -> None:
        pass

    def mark(self, phase: str) -> float:
        return time.perf_counter()


def bigtx_worker(watched: bool, out: Path, argv: list[str]) -> int:
    """One rank of `bigtx train` that records when each step starts and how long each straggler
    gather takes (rank 0 writes both to ``out``); unless ``watched``, without heartbeat, watchdog and
    straggler gathering."""
    from bigtx import train

    starts: list[float] = []
    gathers: list[float] = []
    step, gather = train.train_step, train.stragglers

    def timed_step(*args: object) -> object:
        starts.append(time.perf_counter())
        return step(*args)

    def timed_gather(window: object) -> object:
        t0 = time.perf_counter()
        fields = gather(window)
        gathers.append(time.perf_counter() - t0)
        return fields

    train.train_step = timed_step
    train.stragglers = timed_gather if watched else lambda window: {}
    if not watched:
        train.Heartbeat = Unwatched
    code = train.main(argv)
    if os.environ["RANK"] == "0":
        out.write_text(json.dumps({"steps": [b - a for a, b in zip(starts, starts[1:])], "gathers": gathers}))
    return code


def run_bigtx_watch(
    watched: bool, steps: int, precision: str, stage: int, shards: Path, work: Path
) -> tuple[float, float | None]:
    """Median time per step (start to start, steps after the warm-up) with or without the watch, and
    the median straggler gather (None without)."""
    run_dir = work / f"bigtx-watch{int(watched)}-z{stage}-{time.monotonic_ns()}"
    out = work / f"watch{int(watched)}-z{stage}.json"
    overrides = bigtx_overrides(run_dir, shards, steps, precision, stage)
    cmd = [sys.executable, __file__, "--bigtx-worker", str(int(watched)), str(out), "tiny"]
    cmd += [f"--set={o}" for o in overrides]
    root = str(Path(__file__).resolve().parents[1])
    procs = spawn_local(cmd, 2, {"BIGTX_DIST_TIMEOUT_S": "120", "PYTHONPATH": root})
    assert all(p.wait() == 0 for p in procs), "bigtx worker failed"
    result = json.loads(out.read_text())
    gathers = result["gathers"][WARMUP:]
    return statistics.median(result["steps"][WARMUP:]), statistics.median(gathers) if gathers else None


def watch_cost(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards = build_shards(work)
        times: dict[tuple[int, bool], list[float]] = {(s, w): [] for s in args.stages for w in (False, True)}
        gathers: dict[int, list[float]] = {s: [] for s in args.stages}
        for _ in range(args.repeats):
            for stage in args.stages:
                for watched in (False, True):
                    step_s, gather_s = run_bigtx_watch(watched, args.steps, args.precision, stage, shards, work)
                    times[stage, watched].append(step_s)
                    if gather_s is not None:
                        gathers[stage].append(gather_s)
    print(f"model {' '.join(MODEL)}; 2 ranks gloo CPU; {args.precision}; train.log_every=1; {args.repeats} repeats")
    print(
        f"{'config':<9} {'without s':>10} {'with s':>9} {'with/without':>13} {'gather ms':>10} {'gather/step':>12}"
        "  (each repeat's ratio)"
    )
    rows = []
    for stage in args.stages:
        off, on = statistics.median(times[stage, False]), statistics.median(times[stage, True])
        gather = statistics.median(gathers[stage])
        each = [b / a for a, b in zip(times[stage, False], times[stage, True])]
        rows.append(
            {
                "zero_stage": stage,
                "without_s": off,
                "with_s": on,
                "ratio": on / off,
                "repeat_ratios": each,
                "gather_s": gather,
            }
        )
        ratios = " ".join(f"{r:.3f}" for r in each)
        print(
            f"{'ZeRO-' + str(stage):<9} {off:>10.4f} {on:>9.4f} {on / off:>13.4f} {gather * 1e3:>10.3f} "
            f"{gather / off:>12.5f}  {ratios}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"precision": args.precision, "steps": args.steps, "watch_cost": rows}, indent=2))
    print(f"wrote {out}")


def build_shards(work: Path) -> Path:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(str(p) for p in stdlib.glob("*.py"))[:200]
    out = work / "shards"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bigtx",
            "data",
            "build",
            "--input",
            *files,
            "--tokenizer",
            "byte",
            "--out",
            str(out),
            "--val-fraction",
            "0.05",
            "--shard-size",
            "500KB",
        ],
        check=True,
        capture_output=True,
    )
    return out


def against(args: argparse.Namespace) -> None:
    """This checkout's `bigtx train` against ``args.against``'s, alternating, per stage."""
    other = Path(args.against).resolve()
    here = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards = build_shards(work)
        times: dict[tuple[int, str], list[float]] = {(s, side): [] for s in args.stages for side in ("this", "other")}
        for _ in range(args.repeats):
            for stage in args.stages:
                times[stage, "other"].append(run_bigtx(args.steps, args.precision, stage, shards, work, other))
                times[stage, "this"].append(run_bigtx(args.steps, args.precision, stage, shards, work, here))
    print(f"bigtx {here} against {other}; {args.precision}; {args.repeats} alternating repeats")
    print(f"{'config':<9} {'other s':>9} {'this s':>9} {'this/other':>11}")
    rows = []
    for stage in args.stages:
        o, t = statistics.median(times[stage, "other"]), statistics.median(times[stage, "this"])
        rows.append({"zero_stage": stage, "other_step_s": o, "this_step_s": t, "this_over_other": t / o,
                     "other_runs": times[stage, "other"], "this_runs": times[stage, "this"]})  # fmt: skip
        print(f"{'ZeRO-' + str(stage):<9} {o:>9.4f} {t:>9.4f} {t / o:>11.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"precision": args.precision, "steps": args.steps, "against": str(other), "rows": rows}))
    print(f"wrote {out}")


def document_mask_cost(args: argparse.Namespace) -> None:
    """`bigtx train` with data.document_mask on against off, alternating, per stage."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards = build_shards(work)
        times: dict[tuple[int, bool], list[float]] = {(s, m): [] for s in args.stages for m in (False, True)}
        for _ in range(args.repeats):
            for stage in args.stages:
                for mask in (False, True):
                    flag = (f"data.document_mask={str(mask).lower()}",)
                    times[stage, mask].append(run_bigtx(args.steps, args.precision, stage, shards, work, extra=flag))
    print(f"model {' '.join(MODEL)}; 2 ranks gloo CPU; {args.precision}; {args.repeats} alternating repeats")
    print(f"{'config':<9} {'off s':>9} {'on s':>9} {'on/off':>7}  (each repeat's ratio)")
    rows = []
    for stage in args.stages:
        off, on = statistics.median(times[stage, False]), statistics.median(times[stage, True])
        each = [b / a for a, b in zip(times[stage, False], times[stage, True])]
        rows.append({"zero_stage": stage, "off_step_s": off, "on_step_s": on, "on_over_off": on / off,
                     "repeat_ratios": each})  # fmt: skip
        print(
            f"{'ZeRO-' + str(stage):<9} {off:>9.4f} {on:>9.4f} {on / off:>7.3f}  {' '.join(f'{r:.3f}' for r in each)}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"precision": args.precision, "steps": args.steps, "document_mask": rows}, indent=2))
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 2, 3])
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", help="JSON results (default bench_results/bench_train[_watch].json)")
    parser.add_argument("--ddp-worker", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--ds-worker", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--watch-cost", action="store_true", help="bigtx with vs without heartbeat/watchdog/stragglers")
    parser.add_argument("--against", help="another bigtx checkout: its `bigtx train` against this one's")
    parser.add_argument("--document-mask", action="store_true", help="bigtx with data.document_mask on vs off")
    parser.add_argument("--bigtx-worker", nargs=2, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.bigtx_worker:
        code = bigtx_worker(args.bigtx_worker[0] == "1", Path(args.bigtx_worker[1]), rest)
        sys.stdout.flush()
        os._exit(code)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.out is None:
        suffix = "_watch" if args.watch_cost else "_against" if args.against else ""
        suffix = "_document_mask" if args.document_mask else suffix
        args.out = f"bench_results/bench_train{suffix}.json"
    if args.document_mask:
        document_mask_cost(args)
        return
    if args.against:
        against(args)
        return
    if args.watch_cost:
        watch_cost(args)
        return
    if args.ddp_worker:
        ddp_worker(int(args.ddp_worker[0]), args.ddp_worker[1], Path(args.ddp_worker[2]))
        return
    if args.ds_worker:
        steps, precision, stage, out = args.ds_worker
        deepspeed_worker(int(steps), precision, int(stage), Path(out))
        sys.stdout.flush()
        os._exit(0)  # as bigtx.train does: DeepSpeed's comm threads can abort interpreter teardown

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards = build_shards(work)
        ddp_times = []
        ds_times: dict[int, list[float]] = {s: [] for s in args.stages}
        bigtx_times: dict[int, list[float]] = {s: [] for s in args.stages}
        for _ in range(args.repeats):  # alternate, so drift in machine load hits every side
            ddp_times.append(run_ddp(args.steps, args.precision, work))
            for stage in args.stages:
                ds_times[stage].append(run_deepspeed(args.steps, args.precision, stage, work))
                bigtx_times[stage].append(run_bigtx(args.steps, args.precision, stage, shards, work))
    ddp = statistics.median(ddp_times)
    rows = []
    print(
        f"model {' '.join(MODEL)}; 2 ranks gloo CPU; {args.precision}; median step time over steps "
        f"{WARMUP + 1}..{args.steps}, {args.repeats} alternating repeats"
    )
    print(
        f"{'config':<9} {'DDP s':>8} {'DeepSpeed s':>12} {'bigtx s':>9} {'bigtx/DDP':>10} {'DS/DDP':>7} {'bigtx/DS':>9}"
    )
    for stage in args.stages:
        t, d = statistics.median(bigtx_times[stage]), statistics.median(ds_times[stage])
        rows.append(
            {
                "zero_stage": stage,
                "ddp_step_s": ddp,
                "deepspeed_step_s": d,
                "bigtx_step_s": t,
                "bigtx_over_ddp": t / ddp,
                "deepspeed_over_ddp": d / ddp,
                "bigtx_over_deepspeed": t / d,
            }
        )
        print(
            f"{'ZeRO-' + str(stage):<9} {ddp:>8.4f} {d:>12.4f} {t:>9.4f} {t / ddp:>10.3f} {d / ddp:>7.3f} {t / d:>9.3f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"precision": args.precision, "steps": args.steps, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

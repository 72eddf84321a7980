"""Step time of `bigtx train` against a plain PyTorch DDP loop: same model, batch, ranks, precision.

    python tools/bench_train.py [--steps 40] [--stages 0 2 3] [--out bench_results/bench_train.json]

Every side runs on 2 local gloo ranks, one after the other, alternating, `--repeats` times:

* DDP: a hand-written DistributedDataParallel + torch AdamW loop over in-memory batches;
* DeepSpeed: the same loop on a bare DeepSpeed engine with the config bigtx derives (no bigtx
  loader, metrics or checkpoint logic), to show where the time goes;
* bigtx: `bigtx train`, median `step_time_s` from `metrics.jsonl` (its loader, metrics and the
  per-step loss/stop all-reduce included).

bigtx/DDP is the overhead the issue asks about; bigtx/DeepSpeed is what bigtx itself adds.
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


def run_bigtx(steps: int, precision: str, stage: int, shards: Path, work: Path) -> float:
    run_dir = work / f"bigtx-z{stage}-{time.monotonic_ns()}"
    overrides = MODEL + [
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
    cmd = [sys.executable, "-m", "bigtx.train", "tiny", *(f"--set={o}" for o in overrides)]
    procs = spawn_local(cmd, 2, {"BIGTX_DIST_TIMEOUT_S": "120"})
    assert all(p.wait() == 0 for p in procs), "bigtx train failed"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["step_time_s"] for r in records if "loss" in r and r["step"] > WARMUP)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 2, 3])
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="bench_results/bench_train.json")
    parser.add_argument("--ddp-worker", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--ds-worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
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

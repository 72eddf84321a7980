"""The memory planner's activations against measured peaks on the CPU.

    python tools/bench_plan.py [--out bench_results/bench_plan.json]

Each case runs 2 local gloo ranks of a bare DeepSpeed engine with the config bigtx derives (the spec
overrides in CASES). After one full step (everything DeepSpeed allocates is allocated) a rank records
its RSS, resets its peak (Linux: ``/proc/self/clear_refs``), runs one forward and backward and reads
the peak (VmHWM). Peak over that baseline is compared with ``activation_bytes(..., device="cpu")``,
plus, under ZeRO-3, the gathered weights the forward keeps for the backward (``held_gathered_params``)
and the flat copy of a gradient bucket that DeepSpeed makes while reducing it (freed after).
The models are small and the batches long, so that the gradients written during the backward (what
else can grow) stay a few percent of the activations; glibc's mmap threshold is pinned so that every
freed tensor leaves the RSS.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bare_engine import deepspeed_engine
from local_ranks import spawn_local

BASE = [
    "model.vocab_size=320",
    "model.n_heads=8",
    "model.n_kv_heads=4",
    "model.max_seq_len=1024",
    "train.grad_accum=1",
]
D256 = ["model.d_model=256", "model.n_layers=4", "model.d_ff=688", "data.seq_len=512", "train.micro_batch_size=4"]
CASES: dict[str, list[str]] = {
    "d256 L4 T512 b4 bf16 ZeRO-2": [*D256, "zero.stage=2"],
    "same, checkpointing": [*D256, "zero.stage=2", "model.activation_checkpointing=every"],
    "same, ZeRO-3": [*D256, "zero.stage=3"],
    "d128 L6 T1024 b4 fp32 ZeRO-1": [
        "model.d_model=128",
        "model.n_layers=6",
        "model.d_ff=352",
        "data.seq_len=1024",
        "train.micro_batch_size=4",
        "zero.stage=1",
        "precision=fp32",
    ],
    # wide and short: what the forward holds is mostly gathered weights, not activations
    "d768 L4 T64 b2 bf16 ZeRO-3": [
        "model.d_model=768",
        "model.n_layers=4",
        "model.d_ff=2048",
        "data.seq_len=64",
        "train.micro_batch_size=2",
        "zero.stage=3",
    ],
    # fp32: bf16 matmuls as large as this head are slow on CPUs without bf16 units
    "d384 L3 T256 b8 V2048 fp32 ZeRO-3 ckpt": [
        "model.d_model=384",
        "model.n_layers=3",
        "model.d_ff=1024",
        "model.vocab_size=2048",
        "data.seq_len=256",
        "train.micro_batch_size=8",
        "zero.stage=3",
        "model.activation_checkpointing=every",
        "precision=fp32",
    ],
}
WARMUP_STEPS = 1


def _status(field: str) -> int:
    """A VmRSS/VmHWM line of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(overrides: list[str], out: Path) -> None:
    """One rank: build, warm up, then measure the peak of one forward + backward over the RSS before it."""
    import torch
    import torch.distributed as dist

    from bigtx.config import load_spec

    spec = load_spec("tiny", BASE + overrides)
    engine = deepspeed_engine(spec, threads=1)
    micro, seq = spec.batch_sizes(dist.get_world_size())[0], spec.data.seq_len
    gen = torch.Generator().manual_seed(dist.get_rank())
    tokens = torch.randint(0, 256, (WARMUP_STEPS + 1, micro, seq + 1), generator=gen)
    for i in range(WARMUP_STEPS):
        loss = engine(tokens[i, :, :-1], tokens[i, :, 1:])
        engine.backward(loss)
        engine.step()
    del loss
    gc.collect()
    dist.barrier()
    baseline = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    t0 = time.perf_counter()
    loss = engine(tokens[-1, :, :-1], tokens[-1, :, 1:])
    engine.backward(loss)
    peak = _status("VmHWM")
    seconds = time.perf_counter() - t0
    engine.step()
    results: list = [None] * dist.get_world_size()
    dist.all_gather_object(results, {"baseline": baseline, "peak": peak, "seconds": seconds})
    if dist.get_rank() == 0:
        out.write_text(json.dumps(results))


def run_case(overrides: list[str], work: Path) -> list[dict]:
    out = work / "ranks.json"
    env = {
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        # freed tensors go back to the OS at once (glibc otherwise raises the threshold and keeps them)
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "OMP_NUM_THREADS": "1",
    }
    procs = spawn_local([sys.executable, __file__, "--worker", json.dumps(overrides), str(out)], 2, env)
    assert all(p.wait() == 0 for p in procs), f"worker failed: {overrides}"
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_results/bench_plan.json")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker[0]), Path(args.worker[1]))
        sys.stdout.flush()
        os._exit(0)  # as bigtx.train does: DeepSpeed's comm threads can abort interpreter teardown

    from bigtx.config import load_spec
    from bigtx.config.deepspeed_config import ZERO3_REDUCE_BUCKET
    from bigtx.config.memory_plan import activation_bytes, held_gathered_params

    rows = []
    t0 = time.perf_counter()
    print(f"{'case':<42} {'planned MB':>11} {'measured MB':>12} {'ratio':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in CASES.items():
            spec = load_spec("tiny", BASE + overrides)
            planned = activation_bytes(spec.model, spec.batch_sizes(2)[0], spec.data.seq_len, spec.precision, "cpu")
            if spec.zero.stage == 3:
                # the gathered weights autograd keeps for the backward (none if checkpointed), and the flat
                # copy of a gradient bucket made while it is reduced: freed after it, so not in the baseline
                low = 4 if spec.precision == "fp32" else 2
                bucket = min(ZERO3_REDUCE_BUCKET, spec.model.num_params())
                planned += low * (held_gathered_params(spec.model) + bucket)
            ranks = run_case(overrides, Path(tmp))
            measured = max(r["peak"] - r["baseline"] for r in ranks)
            rows.append(
                {
                    "case": name,
                    "overrides": overrides,
                    "planned_bytes": planned,
                    "measured_bytes": measured,
                    "ratio": measured / planned,
                    "ranks": ranks,
                }
            )
            print(f"{name:<42} {planned / 1e6:>11.1f} {measured / 1e6:>12.1f} {measured / planned:>6.2f}", flush=True)
    elapsed = time.perf_counter() - t0
    print(
        f"2 gloo ranks per case, peak RSS of one forward+backward over the RSS before it (the larger rank); "
        f"ratio = measured / planned; {elapsed:.0f} s"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "seconds": elapsed}, indent=2))
    print(json.dumps([{k: r[k] for k in ("case", "planned_bytes", "measured_bytes", "ratio")} for r in rows]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Checkpoint save/load speed and size for a preset (default llama-125m), CPU, 2 ranks, ZeRO-2 bf16.

    python tools/bench_ckpt.py [--preset llama-125m] [--out bench_results/bench_ckpt.json]

In one run, each rank: builds the model and DeepSpeed engine, takes one optimizer step (so the
optimizer state exists), then alternately (a) saves and loads a bigtx checkpoint (DeepSpeed's
sharded save + per-rank state + sha256 commit marker; load = verify + DeepSpeed load) and (b)
`torch.save`/`torch.load`s the same tensors (module and this rank's optimizer state dict) to
one file per rank. MB/s = bytes on disk / wall time, max over ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from local_ranks import spawn_local


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def worker(preset: str, work: Path, repeats: int) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from bigtx import checkpoint
    from bigtx.config import load_spec
    from bigtx.config.deepspeed_config import derive_deepspeed_config
    from bigtx.model import Transformer
    from bigtx.optim import param_groups

    deepspeed.init_distributed("gloo", verbose=False)
    deepspeed.utils.logger.setLevel("WARNING")
    rank, world = dist.get_rank(), dist.get_world_size()
    spec = load_spec(
        preset,
        [
            "zero.stage=2",
            "precision=bf16",
            "train.micro_batch_size=1",
            "train.grad_accum=1",
            "train.global_batch_size=null",
            "data.seq_len=16",
        ],
    )
    model = Transformer(spec.model)
    model.init_weights(spec.run.seed)
    checkpoint.mark_universal_capable(model)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, spec.optim), config=derive_deepspeed_config(spec, world)
    )
    x = torch.randint(0, spec.model.vocab_size, (1, 17))
    loss = engine(x[:, :-1], x[:, 1:])
    engine.backward(loss)
    engine.step()

    def timed(fn, *args) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        fn(*args)
        dist.barrier()
        return time.perf_counter() - t0

    def bigtx_load(path: Path) -> None:
        assert checkpoint.verify(path) == []
        engine.load_checkpoint(str(path.parent), tag=path.name, load_lr_scheduler_states=False)

    def plain_save(target: Path) -> None:
        state = {"optimizer": engine.optimizer.state_dict()}
        if rank == 0:
            state["module"] = engine.module.state_dict()
        torch.save(state, target)

    results: dict[str, list[float]] = {"bigtx_save": [], "bigtx_load": [], "torch_save": [], "torch_load": []}
    root, plain = work / "bigtx", work / "plain"
    plain.mkdir(parents=True, exist_ok=True)
    target = plain / f"rank{rank}.pt"
    sizes = {}
    for i in range(repeats):
        meta = {
            "step": i + 1,
            "tokens": 0,
            "world_size": world,
            "zero_stage": 2,
            "spec": {},
            "spec_hash": "",
            "bigtx_version": "bench",
        }
        results["bigtx_save"].append(timed(checkpoint.save, engine, root, i + 1, {"rank": rank}, meta))
        path = root / checkpoint.tag_for(i + 1)
        results["bigtx_load"].append(timed(bigtx_load, path))
        sizes["bigtx"] = dir_bytes(path)
        results["torch_save"].append(timed(plain_save, target))
        results["torch_load"].append(timed(lambda: torch.load(target, weights_only=False)))
        sizes["torch"] = dir_bytes(plain)
        if rank == 0:
            shutil.rmtree(path)
        dist.barrier()
    if rank == 0:
        (work / "result.json").write_text(json.dumps({"times": results, "bytes": sizes}))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-125m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench_results/bench_ckpt.json")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], Path(args.worker[1]), int(args.worker[2]))
        return
    with tempfile.TemporaryDirectory(dir=os.environ.get("BIGTX_BENCH_TMP")) as tmp:
        work = Path(tmp)
        cmd = [sys.executable, __file__, "--worker", args.preset, str(work), str(args.repeats)]
        procs = spawn_local(cmd, 2, {"PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        assert all(p.wait() == 0 for p in procs), "benchmark worker failed"
        result = json.loads((work / "result.json").read_text())
    t, b = result["times"], result["bytes"]
    rows = {}
    print(f"{args.preset}, 2 ranks, ZeRO-2 bf16, CPU; median of {args.repeats}")
    print(
        f"{'':<6} {'bigtx MB':>9} {'bigtx s':>8} {'bigtx MB/s':>11} {'torch MB':>9} {'torch s':>8} "
        f"{'torch MB/s':>11} {'ratio':>6}"
    )
    for op in ("save", "load"):
        bt, tt = statistics.median(t[f"bigtx_{op}"]), statistics.median(t[f"torch_{op}"])
        bmb, tmb = b["bigtx"] / 1e6, b["torch"] / 1e6
        rows[op] = {
            "bigtx_mb": bmb,
            "bigtx_s": bt,
            "bigtx_mb_s": bmb / bt,
            "torch_mb": tmb,
            "torch_s": tt,
            "torch_mb_s": tmb / tt,
            "ratio_mb_s": (bmb / bt) / (tmb / tt),
        }
        r = rows[op]
        print(
            f"{op:<6} {bmb:>9.0f} {bt:>8.2f} {r['bigtx_mb_s']:>11.0f} {tmb:>9.0f} {tt:>8.2f} {r['torch_mb_s']:>11.0f} "
            f"{r['ratio_mb_s']:>6.2f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"preset": args.preset, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Checkpoint save/load speed and size for a preset (default llama-125m), CPU, 2 ranks, ZeRO-2 bf16.

    python tools/bench_ckpt.py [--preset llama-125m] [--repeats 3] [--out bench_results/bench_ckpt.json]

In one run, each rank: builds the model and DeepSpeed engine, takes one optimizer step (so the
optimizer state exists), then per repeat (a) saves a bigtx checkpoint synchronously (DeepSpeed's
sharded save, per-rank state, files hashed while written, commit marker) and loads it (verify +
DeepSpeed load), (b) saves one with ``checkpoint.async`` and times only the training stall (the
snapshot into host memory; the background write is waited for untimed), (c) ``torch.save``s and
``torch.load``s the same tensors (module and this rank's optimizer state dict) to one file per rank.
MB/s = bytes on disk / wall time, max over ranks (each timing sits between two barriers).
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
    from bigtx.checkpoint.saver import Saver
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

    ops = ("bigtx_save", "bigtx_load", "async_stall", "torch_save", "torch_load")
    results: dict[str, list[float]] = {op: [] for op in ops}
    root, plain = work / "bigtx", work / "plain"
    plain.mkdir(parents=True, exist_ok=True)
    target = plain / f"rank{rank}.pt"
    keep = dict(keep_last=2 * repeats, keep_every=0, commit_timeout_s=600)
    sync, background = Saver(engine, root, background=False, **keep), Saver(engine, root, background=True, **keep)
    sizes = {}
    for i in range(repeats):
        meta = {"step": i, "world_size": world, "zero_stage": 2, "spec": {}, "bigtx_version": "bench"}
        results["bigtx_save"].append(timed(sync.save, 2 * i + 1, {"rank": rank}, meta))
        path = root / checkpoint.tag_for(2 * i + 1)
        results["bigtx_load"].append(timed(bigtx_load, path))
        sizes["bigtx"] = dir_bytes(path)
        results["async_stall"].append(timed(background.save, 2 * i + 2, {"rank": rank}, meta))
        background.wait()
        dist.barrier()
        results["torch_save"].append(timed(plain_save, target))
        results["torch_load"].append(timed(lambda: torch.load(target, weights_only=False)))
        sizes["torch"] = dir_bytes(plain)
        if rank == 0:
            shutil.rmtree(path)
            shutil.rmtree(root / checkpoint.tag_for(2 * i + 2))
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
    med = {op: statistics.median(times) for op, times in t.items()}
    mb = {"bigtx": b["bigtx"] / 1e6, "torch": b["torch"] / 1e6}
    rows = {
        "save": {"bigtx_s": med["bigtx_save"], "torch_s": med["torch_save"]},
        "load": {"bigtx_s": med["bigtx_load"], "torch_s": med["torch_load"]},
    }
    for row in rows.values():
        row.update(bigtx_mb=mb["bigtx"], torch_mb=mb["torch"])
        row.update(bigtx_mb_s=mb["bigtx"] / row["bigtx_s"], torch_mb_s=mb["torch"] / row["torch_s"])
        row["ratio_mb_s"] = row["bigtx_mb_s"] / row["torch_mb_s"]
    stall = {"async_stall_s": med["async_stall"], "sync_save_s": med["bigtx_save"]}
    stall["ratio"] = stall["async_stall_s"] / stall["sync_save_s"]
    print(f"{args.preset}, 2 ranks, ZeRO-2 bf16, CPU; median of {args.repeats}")
    print(
        f"{'':<6} {'bigtx MB':>9} {'bigtx s':>8} {'bigtx MB/s':>11} {'torch MB':>9} {'torch s':>8} "
        f"{'torch MB/s':>11} {'ratio':>6}"
    )
    for op, r in rows.items():
        print(
            f"{op:<6} {r['bigtx_mb']:>9.0f} {r['bigtx_s']:>8.2f} {r['bigtx_mb_s']:>11.0f} {r['torch_mb']:>9.0f} "
            f"{r['torch_s']:>8.2f} {r['torch_mb_s']:>11.0f} {r['ratio_mb_s']:>6.2f}"
        )
    print(
        f"async: training stalls {stall['async_stall_s']:.3f}s per save against {stall['sync_save_s']:.2f}s "
        f"synchronous: {stall['ratio']:.3f}x (each repeat: {', '.join(f'{x:.3f}' for x in t['async_stall'])} s)"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"preset": args.preset, "rows": rows, "async": stall, "times": t}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

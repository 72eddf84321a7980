"""Knowledge distillation on the demo corpus: does a distilled student beat a plain one, and what it costs.

    python tools/bench_distill.py [--steps 1000] [--top-k 32] [--work /tmp/bench_distill]
                                  [--out bench_results/bench_distill.json]

In one run, all single-process `bigtx train` runs (fp32, CPU) on the demo corpus (`bigtx demo`'s:
the standard library's sources, its 4096-token BPE tokenizer and shards, built in --work if missing):

1. a teacher (about 7x the student's parameters) is trained for --steps steps;
2. the student is trained for the same steps, the same data and seed: plain (CE only), with online
   top-k KD from the teacher (alpha 0.5, temperature 1), and from a teacher cache built with
   `bigtx distill cache` for that run (the same loss as online, read instead of computed);
3. reported: each run's final validation CE (the same val batches for all), the median step time of
   each student run and their ratios to the plain student's, the cache build's tokens/s and the cache's
   bytes per token.

Steps and sizes are chosen to finish in about 13 minutes on 2 cores; timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bigtx.config import load_spec

REPO = Path(__file__).resolve().parents[1]
BIGTX = [sys.executable, "-m", "bigtx"]
# model sizes on the demo tokenizer's 4096 tokens, tied embeddings
STUDENT = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=176"]
TEACHER = ["model.d_model=192", "model.n_layers=4", "model.n_heads=6", "model.n_kv_heads=3", "model.d_ff=512"]


def run(cmd: list[str]) -> str:
    shown = " ".join(["bigtx", *cmd[3:]] if cmd[:3] == BIGTX else cmd)
    print(f"$ {shown}", flush=True)
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(REPO)})
    if result.returncode != 0:
        sys.exit(f"failed (exit {result.returncode}): {shown}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def demo_data(work: Path) -> tuple[Path, Path]:
    """The demo's tokenizer and shards, built as `bigtx demo` builds them (reused when present)."""
    from bigtx.cli.demo_cmd import build_corpus

    corpus = build_corpus(work / "corpus")
    tokenizer, shards = work / "tokenizer.json", work / "shards"
    if not tokenizer.exists():
        run([*BIGTX, "tokenizer", "train", "--input", str(corpus), "--vocab-size", "4096", "--out", str(tokenizer)])
    if not (shards / "index.json").exists():
        build = ["data", "build", "--input", str(corpus), "--tokenizer", str(tokenizer), "--out", str(shards)]
        run([*BIGTX, *build, "--val-fraction", "0.05", "--shard-size", "1MB"])
    return tokenizer, shards


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train(name: str, work: Path, common: list[str], extra: list[str]) -> dict:
    """A fresh single-process run; its final val CE, median step time (first window left out) and params."""
    run_dir = work / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [*common, f"run.dir={run_dir}", f"run.name={name}", *extra]
    t0 = time.perf_counter()
    run([*BIGTX, "train", "demo", *(f"--set={o}" for o in overrides)])
    wall = time.perf_counter() - t0
    lines = records(run_dir)
    steps = [r["step_time_s"] for r in lines if "step_time_s" in r][1:]
    return {
        "run_dir": str(run_dir),
        "val_ce": [r["val_loss"] for r in lines if "val_loss" in r][-1],
        "step_time_s": statistics.median(steps),
        "wall_s": wall,
        "params": load_spec("demo", overrides).model.num_params(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--work", default="/tmp/bench_distill", help="corpus, shards, runs and cache")
    parser.add_argument("--out", default="bench_results/bench_distill.json")
    args = parser.parse_args()
    work = Path(args.work)
    tokenizer, shards = demo_data(work)
    common = [
        f"data.train={shards}",
        f"data.tokenizer={tokenizer}",
        "data.seq_len=128",
        "model.tie_embeddings=true",
        "model.activation_checkpointing=none",
        "precision=fp32",
        "train.micro_batch_size=8",
        f"train.max_steps={args.steps}",
        "train.log_every=10",
        "train.eval_every=0",
        "train.eval_batches=40",
        "schedule.warmup_steps=20",
        "checkpoint.every_steps=0",
    ]
    results: dict[str, dict] = {"teacher": train("teacher", work, common, TEACHER)}
    teacher = results["teacher"]["run_dir"]
    distill = [f"distill.teacher={teacher}", "distill.alpha=0.5", f"distill.top_k={args.top_k}"]
    results["student"] = train("student", work, common, STUDENT)
    results["online_kd"] = train("online_kd", work, common, [*STUDENT, *distill])

    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    out = run(
        [
            *BIGTX,
            "distill",
            "cache",
            "demo",
            *(f"--set={o}" for o in [*common, *STUDENT, *distill]),
            "--out",
            str(cache),
        ]
    )
    built = json.loads(out.strip().splitlines()[-1])
    results["cached_kd"] = train("cached_kd", work, common, [*STUDENT, *distill, f"distill.source={cache}"])

    plain = results["student"]
    summary = {
        "steps": args.steps,
        "top_k": args.top_k,
        "params_ratio": results["teacher"]["params"] / plain["params"],
        "online_kd_step_ratio": results["online_kd"]["step_time_s"] / plain["step_time_s"],
        "cached_kd_step_ratio": results["cached_kd"]["step_time_s"] / plain["step_time_s"],
        "cache_tokens_per_s": built["tokens_per_s"],
        "cache_bytes_per_token": built["bytes_per_token"],
        "cache_tokens": built["tokens"],
        "online_kd_val_ce_gain": plain["val_ce"] - results["online_kd"]["val_ce"],
    }
    print(f"\n{'run':<10} {'params':>10} {'val CE':>8} {'step s':>8} {'x plain':>8}")
    for name, r in results.items():
        ratio = "" if name == "teacher" else f"{r['step_time_s'] / plain['step_time_s']:8.2f}"
        print(f"{name:<10} {r['params']:>10,} {r['val_ce']:8.4f} {r['step_time_s']:8.3f} {ratio:>8}")
    print(
        f"teacher/student params {summary['params_ratio']:.1f}x; cache build {built['tokens_per_s']:,.0f} tokens/s, "
        f"{built['bytes_per_token']:.1f} bytes/token (top-{args.top_k})"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"runs": results, "summary": summary, "cache": built}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

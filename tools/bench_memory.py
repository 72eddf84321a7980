"""Peak host memory per rank of a ZeRO-3 bf16 run on the CPU, against the model states it holds.

    python tools/bench_memory.py [--ranks 2 4] [--steps 2] [--checkout DIR] [--set KEY=VALUE ...]
                                 [--out bench_results/bench_memory.json]

Each rank of `bigtx train` (a 273M-parameter model: d_model 2048, 6 layers, 16 heads, d_ff 4096,
vocab 5120) is a child of this process; its peak resident memory is the ``ru_maxrss`` that
``wait4`` reports when it ends. The baseline is a process that only imports ``deepspeed`` and
``bigtx.train``. The ratio is (peak - baseline) / (16 bytes x parameters / ranks): ZeRO-3 with
mixed precision holds 16 bytes per parameter (bf16 weight and gradient, fp32 master weight and two
Adam moments), split over the ranks. ``--checkout DIR`` measures another checkout of bigtx (e.g. a
git worktree of an older commit) with the same interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from local_ranks import spawn_local

REPO = Path(__file__).resolve().parents[1]
MODEL = [
    "model.d_model=2048",
    "model.n_layers=6",
    "model.n_heads=16",
    "model.n_kv_heads=16",
    "model.d_ff=4096",
    "model.vocab_size=5120",
    "model.max_seq_len=256",
    "data.seq_len=256",
    "train.micro_batch_size=1",
    "train.grad_accum=1",
    "precision=bf16",
    "zero.stage=3",
]
BYTES_PER_PARAM = 16  # bf16 weight + bf16 gradient + fp32 master weight + two fp32 Adam moments


def peak_rss_bytes(procs: list[subprocess.Popen], logs: list[Path] | None = None) -> list[int]:
    """Wait for each process and return its peak resident set (``ru_maxrss`` is in KiB on Linux)."""
    peaks = []
    for i, p in enumerate(procs):
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            tail = logs[i].read_text()[-3000:] if logs else ""
            raise SystemExit(f"bench_memory: rank {i} exited with {p.returncode}:\n{tail}")
        peaks.append(usage.ru_maxrss * 1024)
    return peaks


def checkout_env(checkout: Path) -> dict[str, str]:
    return {"PYTHONPATH": str(checkout), "BIGTX_DIST_TIMEOUT_S": "600", "OMP_NUM_THREADS": "1"}


def baseline(checkout: Path) -> int:
    """Peak memory of a process that only imports what a rank imports."""
    cmd = [sys.executable, "-c", "import deepspeed, bigtx.train"]
    proc = subprocess.Popen(cmd, env={**os.environ, **checkout_env(checkout)}, cwd=checkout)
    return peak_rss_bytes([proc])[0]


def measure(checkout: Path, ranks: int, steps: int, shards: Path, work: Path, extra: list[str]) -> list[int]:
    run_dir = work / f"run-{ranks}"
    overrides = MODEL + [
        f"run.dir={run_dir}",
        f"data.train={shards}",
        f"train.max_steps={steps}",
        "schedule.warmup_steps=1",
        "train.eval_every=0",
        "train.eval_batches=1",  # the final evaluation would otherwise add 8 forwards to a 2-step run
        "checkpoint.every_steps=0",
        "checkpoint.save_at_end=false",
        "train.progress_bar=false",
        *extra,
    ]
    cmd = [sys.executable, "-m", "bigtx.train", "tiny", *(f"--set={o}" for o in overrides)]
    logs = [work / f"rank{r}-of-{ranks}.log" for r in range(ranks)]
    return peak_rss_bytes(spawn_local(cmd, ranks, checkout_env(checkout), logs, cwd=checkout), logs)


def num_params(checkout: Path, extra: list[str]) -> int:
    code = "import sys; from bigtx.config import load_spec; print(load_spec('tiny', sys.argv[1:]).model.num_params())"
    out = subprocess.run(
        [sys.executable, "-c", code, *MODEL, *extra],
        env={**os.environ, **checkout_env(checkout)},
        cwd=checkout,
        check=True,
        capture_output=True,
        text=True,
    )
    return int(out.stdout)


def build_shards(work: Path) -> Path:
    files = sorted(str(p) for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:100]
    out = work / "shards"
    cmd = [
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
    ]
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--checkout", type=Path, default=REPO, help="the bigtx checkout to measure (default: this one)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra spec override (repeatable)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench_results/bench_memory.json"))
    args = parser.parse_args()
    checkout = args.checkout.resolve()
    if not (checkout / "bigtx" / "train.py").is_file():
        parser.error(f"--checkout: {checkout} holds no bigtx/train.py; give the root of a bigtx checkout")

    params = num_params(checkout, args.overrides)
    base = baseline(checkout)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_memory-") as tmp:
        work = Path(tmp)
        shards = build_shards(work)
        for ranks in args.ranks:
            peaks = measure(checkout, ranks, args.steps, shards, work, args.overrides)
            states = BYTES_PER_PARAM * params / ranks
            peak = max(peaks)
            rows.append(
                {
                    "ranks": ranks,
                    "peak_rss_per_rank": peaks,
                    "peak_bytes": peak,
                    "states_per_rank_bytes": states,
                    "ratio": (peak - base) / states,
                }
            )
    commit = subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    result = {
        "checkout": str(checkout),
        "commit": commit,
        "params": params,
        "baseline_bytes": base,
        "steps": args.steps,
        "overrides": MODEL + args.overrides,
        "rows": rows,
    }
    print(f"{checkout} ({commit}): {params / 1e6:.0f}M parameters, baseline (imports) {base / 1e9:.2f} GB")
    print("| ranks | peak per rank | states per rank | (peak - baseline) / states |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['ranks']} | {r['peak_bytes'] / 1e9:.2f} GB | {r['states_per_rank_bytes'] / 1e9:.2f} GB "
            f"| {r['ratio']:.2f}x |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

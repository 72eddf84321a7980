"""`bigtx demo`: the whole life of a model on this machine, with the real commands a user would type.

1. a corpus every machine has offline: the Python standard library's sources (one file = one document);
2. a BPE tokenizer and WebDataset shards (`bigtx tokenizer train`, `bigtx data build`);
3. the `demo` preset on 2 local processes with the `deepspeed` launcher (ZeRO-2, bf16 where the
   machine has bf16 kernels, else fp32; activation checkpointing), stopped part-way with SIGTERM and
   resumed from its checkpoint;
4. export to Hugging Face format with verification, and a sample generated from a prompt;
5. a plot of the curves, and where everything is.

Re-running reuses the corpus, tokenizer, shards and a finished run instead of rebuilding them.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from bigtx.cli.common import UserError
from bigtx.metrics import read_records

BIGTX = [sys.executable, "-m", "bigtx"]


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
    shown = " ".join(shlex.quote(c) for c in (["bigtx", *cmd[3:]] if cmd[:3] == BIGTX else cmd))
    print(f"$ {shown}", flush=True)
    result = subprocess.run(cmd, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise UserError(f"demo step failed (exit {result.returncode}): {shown}")
    return result


def build_corpus(out: Path) -> Path:
    """The standard library's .py files as JSON lines (text, source); skips tests and huge files."""
    corpus = out / "stdlib.jsonl"
    if corpus.exists():
        print(f"reusing {corpus}")
        return corpus
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "site-packages", "idle_test", "lib2to3"}
    files = sorted(
        p for p in stdlib.rglob("*.py") if not skip & set(p.relative_to(stdlib).parts) and p.stat().st_size < 200_000
    )
    out.mkdir(parents=True, exist_ok=True)
    tmp = corpus.with_suffix(".tmp")
    with tmp.open("w") as f:
        for path in files:
            text = path.read_text(encoding="utf-8", errors="replace")
            f.write(json.dumps({"text": text, "source": str(path.relative_to(stdlib))}) + "\n")
    tmp.rename(corpus)
    print(f"{len(files)} files, {corpus.stat().st_size / 1e6:.1f} MB -> {corpus}")
    return corpus


def unigram_entropy(shards: Path) -> float:
    """Entropy (nats/token) of the training split's token frequencies: the loss of the best model
    that ignores context."""
    import numpy as np

    from bigtx.data.shards import read_shard
    from bigtx.data.sources import resolve_source

    source = resolve_source(str(shards), "train", "data.train")
    counts = np.zeros(1 << 16, dtype=np.int64)
    for shard in source.shards:
        for ids in read_shard(shard.url, shard.sha256).docs:
            counts[: ids.max() + 1] += np.bincount(ids)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def last_val_loss(run_dir: Path) -> float:
    return [r["val_loss"] for r in read_records(run_dir / "metrics.jsonl") if "val_loss" in r][-1]


def demo_precision(choice: str) -> str:
    """``auto``: bf16 on a GPU or a CPU with bf16 kernels, else fp32 (bf16 would crawl there)."""
    from bigtx.distributed import fast_bf16

    if choice != "auto" or fast_bf16():
        return "bf16" if choice == "auto" else choice
    print("this CPU has no bf16 matrix kernels (oneDNN needs AVX-512): training in fp32, the fast choice here")
    return "fp32"


def train_with_interruption(overrides: list[str], run_dir: Path, nproc: int, stop_at: int) -> None:
    """Start training, SIGTERM it once `stop_at` steps are logged, then resume to the end."""
    launch = [*BIGTX, "launch", "local", "demo", "--nproc", str(nproc), *(f"--set={o}" for o in overrides)]
    if not (run_dir / "checkpoints").exists():
        shown = " ".join(shlex.quote(c) for c in ["bigtx", *launch[3:]])
        print(f"$ {shown}   # will be stopped with SIGTERM after step {stop_at}", flush=True)
        proc = subprocess.Popen(launch)
        metrics = run_dir / "metrics.jsonl"
        while proc.poll() is None:
            steps = metrics.read_text().count('"loss"') if metrics.exists() else 0
            if steps * 10 >= stop_at:  # log_every is 10
                print(f"\n-- sending SIGTERM to the training job at step ~{stop_at} --", flush=True)
                proc.send_signal(signal.SIGTERM)  # `bigtx launch local` passes it to the ranks
                break
            time.sleep(0.5)
        code = proc.wait()
        print(f"-- training exited with code {code} (75 = checkpointed, please requeue) --", flush=True)
        if code not in (0, 75):
            raise UserError(f"training failed (exit {code}); see {run_dir}/train.log")
        say("Resume: the same command continues from the newest complete checkpoint")
    run(launch)


def demo(args: argparse.Namespace) -> int:
    work = Path(args.workdir)
    run_dir = Path(args.run_dir)
    t0 = time.monotonic()

    say("1/6 Corpus: the Python standard library of this interpreter (documents = files)")
    corpus = build_corpus(work / "corpus")

    say("2/6 Tokenizer and WebDataset shards")
    tokenizer = work / "tokenizer.json"
    if tokenizer.exists():
        print(f"reusing {tokenizer}")
    else:
        run([*BIGTX, "tokenizer", "train", "--input", str(corpus), "--vocab-size", "4096", "--out", str(tokenizer)])
    shards = work / "shards"
    if (shards / "index.json").exists():
        print(f"reusing {shards}")
    else:
        run(
            [
                *BIGTX,
                "data",
                "build",
                "--input",
                str(corpus),
                "--tokenizer",
                str(tokenizer),
                "--out",
                str(shards),
                "--val-fraction",
                "0.05",
                "--shard-size",
                "1MB",
            ]
        )

    precision = demo_precision(args.precision)
    say(f"3/6 Pretraining on 2 processes (deepspeed launcher, ZeRO-2, {precision}, activation checkpointing)")
    overrides = [
        f"precision={precision}",
        f"run.dir={run_dir}",
        f"data.train={shards}",
        f"data.tokenizer={tokenizer}",
        f"train.max_steps={args.steps}",
    ]
    if (run_dir / "FINISHED").exists():
        print(f"reusing the finished run in {run_dir} (delete it to train again)")
    else:
        say("4/6 ... stopped part-way with a signal, then resumed")
        train_with_interruption(overrides, run_dir, args.nproc, stop_at=args.steps // 2)

    entropy = unigram_entropy(shards)
    val = last_val_loss(run_dir)
    print(f"\nunigram entropy of the corpus: {entropy:.3f} nats/token (best loss ignoring context)")
    print(f"final validation loss:         {val:.3f} nats/token (perplexity {math.exp(val):.1f})")

    say("5/6 Export to Hugging Face format, verified, and a sample")
    hf = work / "hf"
    run([*BIGTX, "export", "hf", str(run_dir), "--out", str(hf), "--overwrite", "--verify"])
    run(
        [
            *BIGTX,
            "generate",
            str(hf),
            "--prompt",
            "def parse_args(",
            "--max-new-tokens",
            "120",
            "--temperature",
            "0.8",
            "--top-k",
            "40",
            "--seed",
            "0",
        ]
    )

    say("6/6 Curves and where everything is")
    plot = work / "curves.png"
    run([*BIGTX, "plot", str(run_dir), "--out", str(plot)])
    print(f"""
run directory     {run_dir}/  (spec.yaml, train.log, metrics.jsonl, checkpoints/)
TensorBoard       tensorboard --logdir {run_dir}/tb --host 127.0.0.1
curves            {plot}
Hugging Face      {hf}/  (AutoModelForCausalLM.from_pretrained("{hf}"))
shards            {shards}/  (bigtx data inspect {shards})
took {time.monotonic() - t0:.0f}s""")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="build a corpus, train, interrupt, resume, export and sample: the whole tour")
    p.add_argument("--workdir", default="demo", help="corpus, tokenizer, shards, export (default: demo/)")
    p.add_argument("--run-dir", default="runs/demo", help="the training run directory")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps")
    p.add_argument("--nproc", type=int, default=2, help="training processes")
    p.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp16", "fp32"],
        default="auto",
        help="training precision (default auto: bf16 on GPUs and on CPUs with bf16 kernels, else fp32)",
    )
    p.set_defaults(func=demo)

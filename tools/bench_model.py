"""Training-step throughput and memory of bigtx's Transformer vs transformers.LlamaForCausalLM on the CPU.

Both sides get the same Llama-style config and identical weights (bigtx's ``init_weights`` state dict,
key-mapped into Hugging Face's names) and the same batch. Each (side, precision) runs in its own
worker process, started once; the parent asks the workers for one training step at a time, in
alternating order, so the CPU's background load hits all of them alike. A step is forward + loss +
backward + ``AdamW.step()``; the first ``--warmup`` steps are not timed. Throughput is taken from
each worker's fastest step: other processes on a shared machine only ever add time (the reasoning
of ``timeit``), and single steps here were seen to stretch 5x under a neighbour's load. The median
step and the median of per-rep bigtx/hf ratios (the two sides run back to back) are reported too.

Memory, per worker: the kernel's peak resident set (VmHWM) is reset with ``/proc/self/clear_refs``
after the imports, the model and its weights are in place, so "step memory" = peak RSS during the
steps minus the RSS before them: gradients, AdamW state, activations and allocator slack. Imports
(transformers is the larger one) are excluded from it; "peak RSS" is the whole process.

    .venv/bin/python tools/bench_model.py [--d-model 512 --n-layers 8 ...] [--out bench_results/bench_model.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bigtx.config.spec import ModelSection
from bigtx.export.hf import hf_config
from bigtx.export.weight_map import LLAMA, combine, plan
from bigtx.model import Transformer

SIDES = ("bigtx", "hf")
PRECISIONS = ("fp32", "bf16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab-size", type=int, default=8192, help="Vocabulary rows.")
    p.add_argument("--d-model", type=int, default=512, help="Residual width.")
    p.add_argument("--n-layers", type=int, default=8, help="Blocks.")
    p.add_argument("--n-heads", type=int, default=8, help="Query heads.")
    p.add_argument("--n-kv-heads", type=int, default=4, help="Key/value heads (GQA).")
    p.add_argument("--d-ff", type=int, default=1408, help="SwiGLU hidden width.")
    p.add_argument("--seq-len", type=int, default=256, help="Tokens per sequence.")
    p.add_argument("--batch-size", type=int, default=4, help="Sequences per step.")
    p.add_argument("--warmup", type=int, default=2, help="Untimed steps per worker first.")
    p.add_argument("--reps", type=int, default=8, help="Timed steps per worker.")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads per worker.")
    p.add_argument("--out", default="bench_results/bench_model.json", help="Where to write the JSON results.")
    p.add_argument("--worker", nargs=3, metavar=("SIDE", "PRECISION", "WEIGHTS"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def model_config(args: argparse.Namespace) -> ModelSection:
    return ModelSection(
        vocab_size=args.vocab_size,
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        n_kv_heads=args.n_kv_heads,
        d_ff=args.d_ff,
        max_seq_len=args.seq_len,
    )


def build_side(side: str, cfg: ModelSection, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The model of ``side`` with the weights in ``state`` (bigtx key names)."""
    if side == "bigtx":
        model = Transformer(cfg)
        model.load_state_dict(state)
        return model
    from transformers import LlamaForCausalLM

    # the exporter's own config and weight map: the reference is exactly what `bigtx export hf` writes;
    # transformers picks its SDPA attention by default, the same kernel bigtx calls
    hf_cfg = hf_config(cfg, LLAMA, "fp32", {})
    model = LlamaForCausalLM(hf_cfg)
    conversions = plan(LLAMA, {k: v.shape for k, v in state.items()})
    model.load_state_dict({c.hf: combine(c, [state[k] for k in c.bigtx]) for c in conversions})
    return model


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_worker(args: argparse.Namespace) -> None:
    """Serve training steps over stdin/stdout: one JSON line per "step" command, memory on "done"."""
    side, precision, weights = args.worker
    torch.set_num_threads(args.threads)
    cfg = model_config(args)
    model = build_side(side, cfg, torch.load(weights)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    tokens = torch.randint(
        0, cfg.vocab_size, (args.batch_size, args.seq_len + 1), generator=torch.Generator().manual_seed(0)
    )
    x, y = tokens[:, :-1], tokens[:, 1:].contiguous()

    def step() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            if side == "bigtx":
                loss = model(x, y)
            else:
                # shift_labels: HF's own loss on exactly bigtx's targets (no internal shift)
                loss = model(input_ids=x, labels=y, shift_labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    base_kib = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: peak from here on
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "done":
            break
        start = time.perf_counter()
        loss = step()
        seconds = time.perf_counter() - start
        print(json.dumps({"seconds": seconds, "loss": loss.item()}), flush=True)
    peak_kib = _rss_kib("VmHWM")
    print(json.dumps({"base_rss_mib": base_kib / 1024, "peak_rss_mib": peak_kib / 1024}), flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return
    cfg = model_config(args)
    model = Transformer(cfg)
    model.init_weights(0)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.pt"
        torch.save(model.state_dict(), weights)
        del model
        passthrough = sys.argv[1:] if argv is None else argv
        workers = {}
        for precision in PRECISIONS:
            for side in SIDES:
                cmd = [sys.executable, __file__, *passthrough, "--worker", side, precision, str(weights)]
                proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                workers[side, precision] = proc
        for proc in workers.values():
            if proc.stdout is None or proc.stdout.readline().strip() != "ready":
                raise RuntimeError("a benchmark worker failed to start")

        times: dict[tuple[str, str], list[float]] = {key: [] for key in workers}
        losses: dict[tuple[str, str], list[float]] = {key: [] for key in workers}
        keys = list(workers)
        for rep in range(args.warmup + args.reps):
            # alternate who goes first so slow drifts in background load do not favour one side
            for key in keys if rep % 2 == 0 else keys[::-1]:
                proc = workers[key]
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write("step\n")
                proc.stdin.flush()
                result = json.loads(proc.stdout.readline())
                losses[key].append(result["loss"])
                if rep >= args.warmup:
                    times[key].append(result["seconds"])
        memory = {}
        for key, proc in workers.items():
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write("done\n")
            proc.stdin.flush()
            memory[key] = json.loads(proc.stdout.readline())
            proc.wait()

    tokens = args.batch_size * args.seq_len
    runs = {}
    for (side, precision), ts in times.items():
        mem = memory[side, precision]
        runs[f"{side}/{precision}"] = {
            "best_step_s": min(ts),
            "median_step_s": statistics.median(ts),
            "tokens_per_s": tokens / min(ts),
            "step_times_s": ts,
            "losses": losses[side, precision],
            "peak_rss_mib": mem["peak_rss_mib"],
            "step_memory_mib": mem["peak_rss_mib"] - mem["base_rss_mib"],
        }
    ratios = {
        p: {
            "throughput_bigtx_over_hf": runs[f"bigtx/{p}"]["tokens_per_s"] / runs[f"hf/{p}"]["tokens_per_s"],
            "throughput_bigtx_over_hf_paired_median": statistics.median(
                h / b for b, h in zip(times["bigtx", p], times["hf", p])
            ),
            "step_memory_bigtx_over_hf": runs[f"bigtx/{p}"]["step_memory_mib"] / runs[f"hf/{p}"]["step_memory_mib"],
            "first_loss_abs_diff": abs(runs[f"bigtx/{p}"]["losses"][0] - runs[f"hf/{p}"]["losses"][0]),
        }
        for p in PRECISIONS
    }

    print(
        f"config: d_model={cfg.d_model} n_layers={cfg.n_layers} heads={cfg.n_heads}/{cfg.kv_heads} d_ff={cfg.d_ff} "
        f"vocab={cfg.vocab_size} seq={args.seq_len} batch={args.batch_size} threads={args.threads} "
        f"params={cfg.num_params():,}; best and median of {args.reps} steps after {args.warmup} warm-up"
    )
    print(
        f"{'run':<12} {'tokens/s':>9} {'best s':>7} {'median s':>8} "
        f"{'step mem MiB':>13} {'peak RSS MiB':>13} {'loss@0':>8}"
    )
    for name, r in runs.items():
        print(
            f"{name:<12} {r['tokens_per_s']:>9.0f} {r['best_step_s']:>7.3f} {r['median_step_s']:>8.3f} "
            f"{r['step_memory_mib']:>13.0f} "
            f"{r['peak_rss_mib']:>13.0f} {r['losses'][0]:>8.4f}"
        )
    for p, r in ratios.items():
        print(
            f"{p}: throughput bigtx/hf = {r['throughput_bigtx_over_hf']:.3f} "
            f"(median of per-rep ratios {r['throughput_bigtx_over_hf_paired_median']:.3f}), "
            f"step memory bigtx/hf = {r['step_memory_bigtx_over_hf']:.3f}, "
            f"|loss@0 diff| = {r['first_loss_abs_diff']:.2e}"
        )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k not in ("worker", "out")}
    out.write_text(json.dumps({"config": config, "runs": runs, "ratios": ratios}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

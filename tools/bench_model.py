"""Training-step throughput and memory of bigtx's Transformer vs transformers.LlamaForCausalLM on the CPU.

Both sides get the same Llama-style config and identical weights (bigtx's ``init_weights`` state dict,
key-mapped into Hugging Face's names) and the same batch. Each (side, precision) runs in its own
worker process; the parent asks the workers for one training step at a time, in alternating order,
so the CPU's background load hits all of them alike. A step is forward + loss + backward +
``AdamW.step()``; the first ``--warmup`` steps of a worker are not timed.

On a shared 2-core VM a process keeps its luck (memory placement, a neighbour's load) for seconds
to minutes, so one long run can favour one side throughout. The benchmark therefore runs
``--rounds`` rounds, each with freshly started workers, and pools their steps. The headline ratio
is the median over all rounds of the per-rep ratio hf_step / bigtx_step (the two sides run back to
back); the ratio of median steps, of fastest steps and each round's own median are reported too.

Memory, per worker: the kernel's peak resident set (VmHWM) is reset with ``/proc/self/clear_refs``
after the imports, the model and its weights are in place, so "step memory" = peak RSS during the
steps minus the RSS before them: gradients, AdamW state, activations and allocator slack (median
over rounds). Imports (transformers is the larger one) are excluded from it; "peak RSS" is the
whole process.

``--document-mask`` compares bigtx with itself under ``data.document_mask`` instead of with Hugging
Face: the second side ("bigtx+mask") gets the same batch with an EOS every ``--doc-len`` tokens and
its documents (``bigtx.model.documents``); ratios are then bigtx+mask against bigtx.

    .venv/bin/python tools/bench_model.py [--rounds 3 --reps 10 --d-model 512 ...] [--out FILE.json]
    .venv/bin/python tools/bench_model.py --document-mask [--precisions fp32] [--seq-len 1024 ...]
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
from bigtx.model.documents import find_documents

SIDES = ("bigtx", "hf")
MASK_SIDES = ("bigtx", "bigtx+mask")
PRECISIONS = ("fp32", "bf16")
EOS = 0  # the id --document-mask writes between documents


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
    p.add_argument("--reps", type=int, default=10, help="Timed steps per worker and round.")
    p.add_argument("--rounds", type=int, default=3, help="Rounds, each with freshly started workers.")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads per worker.")
    p.add_argument("--out", default="bench_results/bench_model.json", help="Where to write the JSON results.")
    p.add_argument("--document-mask", action="store_true", help="bigtx with document masking against bigtx.")
    p.add_argument("--doc-len", type=int, default=200, help="--document-mask: tokens per document.")
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS), help="Precisions run.")
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
    if side.startswith("bigtx"):
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
    if args.document_mask:
        tokens[:, args.doc_len - 1 :: args.doc_len] = EOS  # the same batch on both sides
    x, y = tokens[:, :-1], tokens[:, 1:].contiguous()

    def step() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            if side == "bigtx+mask":  # found per step, as the trainer does
                loss = model(x, y, documents=find_documents(x, EOS))
            elif side == "bigtx":
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


def run_round(args: argparse.Namespace, weights: Path, argv: list[str]) -> dict[tuple[str, str], dict]:
    """One round: start the four workers, alternate their steps, stop them; times, losses and memory per worker."""
    workers = {}
    for precision in args.precisions:
        for side in MASK_SIDES if args.document_mask else SIDES:
            cmd = [sys.executable, __file__, *argv, "--worker", side, precision, str(weights)]
            workers[side, precision] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    for proc in workers.values():
        if proc.stdout is None or proc.stdout.readline().strip() != "ready":
            raise RuntimeError("a benchmark worker failed to start")

    results: dict[tuple[str, str], dict] = {key: {"times": [], "losses": []} for key in workers}
    keys = list(workers)
    for rep in range(args.warmup + args.reps):
        # alternate who goes first so slow drifts in background load do not favour one side
        for key in keys if rep % 2 == 0 else keys[::-1]:
            proc = workers[key]
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write("step\n")
            proc.stdin.flush()
            result = json.loads(proc.stdout.readline())
            results[key]["losses"].append(result["loss"])
            if rep >= args.warmup:
                results[key]["times"].append(result["seconds"])
    for key, proc in workers.items():
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("done\n")
        proc.stdin.flush()
        results[key]["memory"] = json.loads(proc.stdout.readline())
        proc.wait()
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return
    if args.rounds < 1 or args.reps < 1:
        sys.exit("bench_model: --rounds and --reps must be at least 1")
    cfg = model_config(args)
    model = Transformer(cfg)
    model.init_weights(0)
    passthrough = sys.argv[1:] if argv is None else argv
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.pt"
        torch.save(model.state_dict(), weights)
        del model
        rounds = [run_round(args, weights, passthrough) for _ in range(args.rounds)]

    tokens = args.batch_size * args.seq_len
    runs = {}
    for side, precision in rounds[0]:
        ts = [t for r in rounds for t in r[side, precision]["times"]]
        mems = [r[side, precision]["memory"] for r in rounds]
        runs[f"{side}/{precision}"] = {
            "best_step_s": min(ts),
            "median_step_s": statistics.median(ts),
            "tokens_per_s": tokens / statistics.median(ts),
            "step_times_s": ts,
            "losses": rounds[0][side, precision]["losses"],
            "peak_rss_mib": statistics.median(m["peak_rss_mib"] for m in mems),
            "step_memory_mib": statistics.median(m["peak_rss_mib"] - m["base_rss_mib"] for m in mems),
        }

    ours, other = MASK_SIDES if args.document_mask else SIDES

    def paired(r: dict, p: str) -> list[float]:
        return [h / b for b, h in zip(r[ours, p]["times"], r[other, p]["times"])]

    # step-time ratios are other/ours: with --document-mask, the mask's cost (> 1: slower with it)
    ratios = {
        p: {
            f"throughput_{ours}_over_{other}": statistics.median(x for r in rounds for x in paired(r, p)),
            "per_round": [statistics.median(paired(r, p)) for r in rounds],
            "median_step": runs[f"{other}/{p}"]["median_step_s"] / runs[f"{ours}/{p}"]["median_step_s"],
            "best_step": runs[f"{other}/{p}"]["best_step_s"] / runs[f"{ours}/{p}"]["best_step_s"],
            f"step_memory_{ours}_over_{other}": runs[f"{ours}/{p}"]["step_memory_mib"]
            / runs[f"{other}/{p}"]["step_memory_mib"],
            "first_loss_abs_diff": abs(runs[f"{ours}/{p}"]["losses"][0] - runs[f"{other}/{p}"]["losses"][0]),
        }
        for p in args.precisions
    }

    print(
        f"config: d_model={cfg.d_model} n_layers={cfg.n_layers} heads={cfg.n_heads}/{cfg.kv_heads} d_ff={cfg.d_ff} "
        f"vocab={cfg.vocab_size} seq={args.seq_len} batch={args.batch_size} threads={args.threads} "
        f"params={cfg.num_params():,}; {args.rounds} rounds x {args.reps} timed steps after {args.warmup} warm-up"
    )
    print(
        f"{'run':<17} {'tokens/s':>9} {'best s':>7} {'median s':>8} "
        f"{'step mem MiB':>13} {'peak RSS MiB':>13} {'loss@0':>8}"
    )
    for name, r in runs.items():
        print(
            f"{name:<17} {r['tokens_per_s']:>9.0f} {r['best_step_s']:>7.3f} {r['median_step_s']:>8.3f} "
            f"{r['step_memory_mib']:>13.0f} "
            f"{r['peak_rss_mib']:>13.0f} {r['losses'][0]:>8.4f}"
        )
    for p, r in ratios.items():
        print(
            f"{p}: throughput {ours}/{other} = {r[f'throughput_{ours}_over_{other}']:.3f} (median of paired steps; "
            f"rounds {' '.join(f'{x:.3f}' for x in r['per_round'])}; median steps {r['median_step']:.3f}, "
            f"best steps {r['best_step']:.3f}), "
            f"step memory {ours}/{other} = {r[f'step_memory_{ours}_over_{other}']:.3f}, "
            f"|loss@0 diff| = {r['first_loss_abs_diff']:.2e}"
        )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k not in ("worker", "out")}
    out.write_text(json.dumps({"config": config, "runs": runs, "ratios": ratios}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

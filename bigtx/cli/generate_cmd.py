"""`bigtx generate MODEL --prompt TEXT`: sample a continuation with the KV cache.

MODEL is a run directory (newest complete checkpoint, or --tag), a checkpoint directory, a
`bigtx export safetensors`/`bigtx import hf` directory, or a Hugging Face Llama/GPT-2 directory
(read into bigtx's Transformer). The text is tokenized with the run spec's tokenizer.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from bigtx.cli.common import UserError


def _load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """(Transformer holding the weights in eval mode, the WeightSource they came from)."""
    import torch

    from bigtx.export import open_model, open_source

    source = open_source(Path(args.model), args.tag)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    return open_model(source, dtype, args.device), source


def _tokenizer(source: Any, override: str | None) -> Any:
    from bigtx.data.tokenizer import load_tokenizer
    from bigtx.export.consolidate import find_tokenizer_file

    name = override or source.spec.data.tokenizer
    if name != "byte" and not override:
        found = find_tokenizer_file(name, source.path)
        if found is None:
            raise UserError(f"data.tokenizer: {name} not found for {source.path}; pass --tokenizer PATH")
        name = str(found)
    return load_tokenizer(name)


def _generate(args: argparse.Namespace) -> int:
    import torch

    from bigtx.checkpoint import CheckpointError
    from bigtx.data.errors import DataError
    from bigtx.export import ExportError
    from bigtx.model import generate

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device here; use --device cpu")
    try:
        model, source = _load_model(args)
        tok = _tokenizer(source, args.tokenizer)
    except (ExportError, CheckpointError, DataError) as exc:
        raise UserError(str(exc)) from None
    print(f"model: {source.describe()}", file=sys.stderr)
    prompt = tok.encode(args.prompt)
    t0 = time.perf_counter()
    try:
        new = generate(
            model,
            prompt,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            greedy=args.greedy,
            eos_id=tok.eos_id,
            seed=args.seed,
        )
    except ValueError as exc:  # empty prompt, prompt + new tokens beyond max_seq_len, bad temperature
        raise UserError(str(exc)) from None
    seconds = time.perf_counter() - t0
    print(args.prompt + tok.decode(new))
    print(f"[{len(new)} new tokens in {seconds:.2f}s, {len(new) / max(seconds, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="continue a prompt with a trained model (checkpoint, run dir or exported weights)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="run dir, checkpoint dir, bigtx weights dir or Hugging Face dir")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default 1.0; 0 = greedy)")
    p.add_argument("--top-k", type=int, default=None, help="sample only from the K most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample only from the smallest set with probability P")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--tag", help="checkpoint of a run directory, e.g. step_00000020 (default: newest)")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer to use instead of the run spec's data.tokenizer")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default cpu)")
    p.add_argument(
        "--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="precision to run in (default fp32)"
    )
    p.set_defaults(func=_generate)

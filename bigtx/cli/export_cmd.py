"""`bigtx export hf|safetensors` and `bigtx import hf`: consolidated weights in and out of bigtx."""

from __future__ import annotations

import argparse
from pathlib import Path

from bigtx.cli.common import UserError, fail

_SOURCE_HELP = (
    "a run directory (its newest complete checkpoint, or --tag), a checkpoint directory of any ZeRO stage "
    "or a universal one, or a `bigtx export safetensors`/`bigtx import hf` directory"
)


def _user_errors(func):  # type: ignore[no-untyped-def]
    """Report bad paths, tags, damaged checkpoints and unsupported models as user errors (exit 2)."""

    def run(args: argparse.Namespace) -> int:
        from bigtx.checkpoint import CheckpointError
        from bigtx.export import ExportError

        try:
            return func(args)
        except (ExportError, CheckpointError) as exc:
            raise UserError(str(exc)) from None
        except ModuleNotFoundError as exc:
            if exc.name != "transformers":
                raise
            raise UserError(
                "Hugging Face export and import need transformers: pip install 'transformers>=4.44'"
            ) from None

    return run


def _export_hf(args: argparse.Namespace) -> int:
    from bigtx.export import export_hf, open_source, verify_hf_export

    source = open_source(Path(args.source), args.tag)
    print(f"source: {source.describe()}")
    report = export_hf(
        source, Path(args.out), args.dtype, args.max_shard_size, tokenizer=args.tokenizer, overwrite=args.overwrite
    )
    print(
        f"wrote {report.out}: {report.architecture}, {report.dtype}, {len(report.files)} weight file(s), "
        f"{report.bytes / 1e6:.1f} MB in {report.seconds:.1f}s"
    )
    for note in report.notes:
        print(f"note: {note}")
    if args.verify:
        check = verify_hf_export(source, report.out, args.dtype, tokenizer=args.tokenizer)
        for line in check.lines():
            print(f"verify: {line}")
        if not check.ok:
            fail(f"verification failed for {report.out}", code=1)
        print("verify: ok")
    return 0


def _export_safetensors(args: argparse.Namespace) -> int:
    from bigtx.export import export_safetensors, open_source

    source = open_source(Path(args.source), args.tag)
    print(f"source: {source.describe()}")
    files = export_safetensors(source, Path(args.out), args.dtype, args.max_shard_size, overwrite=args.overwrite)
    print(f"wrote {args.out}: {len(files)} weight file(s) ({args.dtype}, bigtx key names) and spec.yaml")
    print(f"continue pretraining from it: --set model.init_from={Path(args.out).resolve()}")
    return 0


def _import_hf(args: argparse.Namespace) -> int:
    from bigtx.export import import_hf

    source = import_hf(Path(args.source), Path(args.out), args.dtype, args.max_shard_size, overwrite=args.overwrite)
    print(f"source: {source.describe()}")
    print(f"wrote {args.out}: bigtx weights ({args.dtype}) and spec.yaml")
    for note in source.meta.get("notes", []):
        print(f"note: {note}")
    print(f"train from it: bigtx train {Path(args.out) / 'spec.yaml'} --set data.train=... --set run.dir=...")
    return 0


def _add_output_args(p: argparse.ArgumentParser, default_dtype: str = "fp32") -> None:
    p.add_argument(
        "--out", required=True, metavar="DIR", help="output directory: a new or empty one, or an earlier export"
    )
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "fp16"],
        default=default_dtype,
        help=f"precision of the written weights (default {default_dtype}: the fp32 master weights, lossless)",
    )
    p.add_argument(
        "--max-shard-size",
        default="5GB",
        metavar="SIZE",
        help="split the weights into files of at most SIZE (5GB, 500MB, 200KB; default 5GB)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out when it holds an earlier bigtx export (marked by .bigtx-export.json), once the new "
        "export is complete; any other directory is never replaced",
    )


def register(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser(
        "export", help="write consolidated weights: a Hugging Face model or bigtx safetensors", description=__doc__
    )
    esub = export.add_subparsers(dest="export_command", metavar="FORMAT")
    esub.required = True

    hf_help = "a Hugging Face directory (LlamaForCausalLM or GPT2LMHeadModel) that transformers loads as is"
    p = esub.add_parser("hf", help=hf_help, description=hf_help)
    p.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT", help=_SOURCE_HELP)
    p.add_argument("--tag", help="checkpoint of the run directory to export, e.g. step_00000020 (default: newest)")
    _add_output_args(p)
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json to ship (default: the run's data.tokenizer)")
    p.add_argument(
        "--verify",
        action="store_true",
        help="load the export with transformers and compare logits and greedy generation with bigtx's model",
    )
    p.set_defaults(func=_user_errors(_export_hf))

    st_help = "bigtx's own weights (bigtx key names) + spec.yaml, for model.init_from and bigtx generate"
    p = esub.add_parser("safetensors", help=st_help, description=st_help)
    p.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT", help=_SOURCE_HELP)
    p.add_argument("--tag", help="checkpoint of the run directory to export, e.g. step_00000020 (default: newest)")
    _add_output_args(p)
    p.set_defaults(func=_user_errors(_export_safetensors))

    imp = sub.add_parser("import", help="turn a Hugging Face model into bigtx weights + spec.yaml")
    isub = imp.add_subparsers(dest="import_command", metavar="FORMAT")
    isub.required = True
    imp_help = "a Hugging Face Llama (or GPT-2) directory -> bigtx weights + spec.yaml (model.init_from: OUT)"
    p = isub.add_parser("hf", help=imp_help, description=imp_help)
    p.add_argument("source", metavar="DIR", help="Hugging Face model directory (config.json + safetensors weights)")
    _add_output_args(p)
    p.set_defaults(func=_user_errors(_import_hf))

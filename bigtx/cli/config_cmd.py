"""`bigtx config validate|show|schema|presets`."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import yaml

from bigtx.cli.common import UserError, spec_from_args, teacher_model
from bigtx.config import RunSpec, add_spec_args, preset_names, spec_to_dict
from bigtx.config.deepspeed_config import derive_deepspeed_config
from bigtx.memory_check import memory_report


def _world_size(args: argparse.Namespace) -> int:
    return args.world_size or int(os.environ.get("WORLD_SIZE", "1"))


def _checked(args: argparse.Namespace) -> tuple[RunSpec, dict]:
    """The spec and its DeepSpeed config; also checks the vocabulary when the tokenizer exists."""
    from bigtx.data.sources import check_tokenizer

    spec = spec_from_args(args)
    try:
        ds = derive_deepspeed_config(spec, _world_size(args))
        if spec.data.tokenizer == "byte" or Path(spec.data.tokenizer).exists():
            check_tokenizer(spec.data.tokenizer, spec.model.vocab_size)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return spec, ds


def _validate(args: argparse.Namespace) -> int:
    spec, _ = _checked(args)
    print(f"{args.spec}: ok ({spec.model.num_params():,} parameters)")
    return 0


def _show(args: argparse.Namespace) -> int:
    spec, ds = _checked(args)
    if args.deepspeed:
        print(json.dumps(ds, indent=2))
        return 0
    ws = _world_size(args)
    micro, accum, glob = spec.batch_sizes(ws)
    out = spec_to_dict(spec)
    out["derived"] = {
        "world_size": ws,
        "parameters": spec.model.num_params(),
        "micro_batch_size": micro,
        "grad_accum": accum,
        "global_batch_size": glob,
        "tokens_per_step": spec.tokens_per_step(ws),
        "total_steps": spec.total_steps(ws),
        "flops_per_token": spec.model.flops_per_token(spec.data.seq_len),
    }
    print(yaml.safe_dump(out, sort_keys=False), end="")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", ws))
    summary, _ = memory_report(spec, ws, local, ds["zero_optimization"], teacher_model(spec))
    print(f"# {summary}")  # a comment: the output stays valid YAML
    return 0


def _schema(args: argparse.Namespace) -> int:
    print(json.dumps(RunSpec.model_json_schema(), indent=2))
    return 0


def _presets(args: argparse.Namespace) -> int:
    for name in preset_names():
        print(name)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    config = sub.add_parser("config", help="validate, show and describe run specs")
    csub = config.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    csub.required = True

    for name, func, helptext in [
        ("validate", _validate, "check a spec; exit 0, or print every error as field: message and exit 2"),
        ("show", _show, "print the resolved spec with derived values"),
    ]:
        p = csub.add_parser(name, help=helptext, description=helptext)
        add_spec_args(p)
        p.add_argument(
            "--world-size", type=int, default=None, help="ranks to check batch sizes for (default $WORLD_SIZE or 1)"
        )
        if name == "show":
            p.add_argument("--deepspeed", action="store_true", help="print the exact DeepSpeed JSON instead")
        p.set_defaults(func=func)
    p = csub.add_parser("schema", help="print the JSON schema of the run spec")
    p.set_defaults(func=_schema)
    p = csub.add_parser("presets", help="list the shipped run-spec presets")
    p.set_defaults(func=_presets)

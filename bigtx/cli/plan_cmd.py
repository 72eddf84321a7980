"""`bigtx plan SPEC --nodes N --gpus-per-node G`: memory per GPU and per node's host, and what makes it fit."""

from __future__ import annotations

import argparse
import json

from bigtx.cli.common import UserError, spec_from_args, teacher_model
from bigtx.config import add_spec_args
from bigtx.config.deepspeed_config import derive_deepspeed_config
from bigtx.config.memory_plan import CATEGORIES, Cluster, Plan, plan
from bigtx.config.sizes import parse_size


def _size(text: str, option: str) -> int:
    try:
        size = parse_size(text)
    except ValueError as exc:
        raise UserError(f"{option}: {exc}") from None
    if size < 1:
        raise UserError(f"{option}: must be more than 0 bytes, got {text!r}")
    return size


def _cluster(args: argparse.Namespace) -> Cluster:
    for option, value in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node)):
        if value < 1:
            raise UserError(f"{option}: must be at least 1, got {value}")
    return Cluster(
        args.nodes, args.gpus_per_node, _size(args.gpu_memory, "--gpu-memory"), _size(args.host_memory, "--host-memory")
    )


def _gb(n: int) -> str:
    return f"{n / 1e9:,.1f} GB"


def render(result: Plan, title: str) -> str:
    """The human-readable plan: a table per GPU and per node's host, fits yes/no, suggestions."""
    c = result.cluster
    ac = result.activation_checkpointing
    offload = [name for name, on in (("optimizer", result.offload_optimizer), ("params", result.offload_params)) if on]
    lines = [
        f"{title} on {c.nodes} node(s) x {c.gpus_per_node} GPUs ({c.world_size} ranks): {result.precision}, "
        f"ZeRO-{result.stage}{', offload ' + ' + '.join(offload) if offload else ''}, "
        f"micro-batch {result.micro_batch_size} x {result.grad_accum} accumulation, activation checkpointing {ac}",
        "",
        f"{'':14}{'per GPU':>14}{'per node host':>16}",
    ]
    gpu, host = result.per_gpu, result.per_node_host
    for name in CATEGORIES:
        if name == "teacher" and not gpu.teacher:
            continue  # no online distillation teacher
        lines.append(f"{name:14}{_gb(getattr(gpu, name)):>14}{_gb(getattr(host, name)):>16}")
    lines.append(f"{'build (peak)':14}{'-':>14}{_gb(host.build):>16}")
    lines.append(f"{'total':14}{_gb(gpu.total):>14}{_gb(host.total):>16}")
    lines.append(f"{'available':14}{_gb(c.gpu_memory):>14}{_gb(c.host_memory):>16}")
    lines.append(f"{'fits':14}{'yes' if result.fits_gpu else 'NO':>14}{'yes' if result.fits_host else 'NO':>16}")
    lines.append("")
    lines.append(f"fits: {'yes' if result.fits else 'no'}")
    if result.faster:
        lines.append("also fits, and saves work (each re-planned; one change at a time):")
    for i, s in enumerate(result.faster, 1):
        how = " ".join(f"--set {k}={json.dumps(v)}" for k, v in s.overrides.items())
        lines.append(f"  {i}. {s.change}: {_gb(s.gpu_total)} per GPU, {_gb(s.host_total)} per node host")
        lines.append(f"     {how}")
    if not result.fits:
        if result.suggestions:
            lines.append("cheapest changes that make it fit, each re-planned:")
        else:
            lines.append("no combination of stage, offload, checkpointing, micro-batch and up to 4096 nodes fits")
        for i, s in enumerate(result.suggestions, 1):
            how = " ".join(f"--set {k}={json.dumps(v)}" for k, v in s.overrides.items())
            nodes = f"--nodes {s.nodes} " if s.nodes != c.nodes else ""
            lines.append(f"  {i}. {s.change}: {_gb(s.gpu_total)} per GPU, {_gb(s.host_total)} per node host")
            lines.append(f"     {nodes}{how}".rstrip())
    return "\n".join(lines)


def _plan(args: argparse.Namespace) -> int:
    cluster = _cluster(args)
    spec = spec_from_args(args)
    try:
        zero = derive_deepspeed_config(spec, cluster.world_size)["zero_optimization"]
        result = plan(spec, cluster, zero, teacher=teacher_model(spec))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args.json:
        print(json.dumps({"spec": args.spec, **result.to_dict()}, indent=2))
    else:
        print(render(result, args.spec))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    helptext = "memory per GPU and per node's host for a spec on a cluster, and the cheapest changes that fit"
    p = sub.add_parser("plan", help=helptext, description=helptext)
    add_spec_args(p)
    p.add_argument("--nodes", type=int, required=True, help="number of nodes")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs (ranks) per node")
    p.add_argument("--gpu-memory", default="80GB", help="memory of one GPU (default 80GB; GB = 1e9 bytes)")
    p.add_argument("--host-memory", default="1TB", help="host memory of one node (default 1TB)")
    p.add_argument("--json", action="store_true", help="print one JSON object (sizes in bytes)")
    p.set_defaults(func=_plan)

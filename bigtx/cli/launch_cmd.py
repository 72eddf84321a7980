"""`bigtx launch slurm|local`: start `bigtx train` on a SLURM cluster or on this machine."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from bigtx import lifetime
from bigtx.cli.common import UserError, spec_from_args
from bigtx.config import RunSpec, add_spec_args
from bigtx.config.deepspeed_config import derive_deepspeed_config
from bigtx.config.layout import check_layout
from bigtx.launch import local, slurm


def _checked_spec(args: argparse.Namespace, world_size: int, ranks_per_node: int, cuda: bool) -> RunSpec:
    """Load and validate the spec, including its batch sizes and ZeRO layout at this world size (errors exit 2)."""
    spec = spec_from_args(args)
    try:
        derive_deepspeed_config(spec, world_size)
        check_layout(spec.zero, world_size, ranks_per_node, cuda)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return spec


def _slurm(args: argparse.Namespace) -> int:
    try:
        opts = slurm.SlurmOptions(
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            gres=not args.no_gres,
            partition=args.partition,
            time=args.time,
            account=args.account,
            cpus_per_task=args.cpus_per_task,
            mode=args.mode,
            grace=args.grace,
            exit_wait=args.exit_wait,
            env=slurm.env_pairs(args.env),
            sbatch_options=args.sbatch_option,
            python=args.python,
            job_name=args.job_name,
            exclude_stuck_node=args.exclude_stuck_node,
        )
        opts.check()
    except ValueError as exc:
        raise UserError(str(exc)) from None
    # --no-gres is how a CPU cluster is launched; the login node's own GPUs say nothing about the nodes'
    spec = _checked_spec(args, opts.world_size, opts.gpus_per_node, cuda=opts.gres)
    try:
        files = slurm.write_launch(spec, opts, template=args.template)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    print(f"spec:   {files.spec}")
    print(f"script: {files.script}")
    print(f"logs:   {files.run_dir / 'logs'}")
    if not args.submit:
        print(f"submit: sbatch {files.script}")
        return 0
    try:
        job_id = slurm.submit(files.script)
    except RuntimeError as exc:
        print(f"bigtx: error: {exc}", file=sys.stderr)
        return 1
    print(f"submitted job {job_id}")
    print(f"follow: tail -f {files.run_dir / 'logs' / f'slurm-{job_id}.out'}")
    return 0


def _local(args: argparse.Namespace) -> int:
    _checked_spec(args, args.nproc, args.nproc, cuda=torch.cuda.is_available())
    try:
        grace = lifetime.stop_grace()
        cmd = local.local_command(
            args.spec,
            args.overrides,
            args.nproc,
            python=args.python,
            master_port=args.master_port,
            bind_cores=args.bind_cores,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args.dry_run:
        print(" ".join(cmd))
        return 0
    return local.run(cmd, grace)


def _add_slurm(lsub: argparse._SubParsersAction) -> None:
    helptext = "render a SLURM batch script for the run into RUN_DIR/launch/ (and --submit it)"
    p = lsub.add_parser("slurm", help=helptext, description=helptext)
    add_spec_args(p)
    p.add_argument("--nodes", type=int, default=1, help="nodes to allocate (default 1)")
    p.add_argument(
        "--gpus-per-node", type=int, default=1, metavar="G", help="GPUs per node = ranks per node (default 1)"
    )
    p.add_argument(
        "--no-gres", action="store_true", help="do not request --gres=gpu:G (CPU clusters; G still sets ranks per node)"
    )
    p.add_argument("--partition", help="SLURM partition")
    p.add_argument("--time", metavar="HH:MM:SS", help="time limit (SLURM format, e.g. 24:00:00 or 2-00:00:00)")
    p.add_argument("--account", help="SLURM account to charge")
    p.add_argument("--cpus-per-task", type=int, metavar="C", help="CPUs per rank")
    p.add_argument(
        "--mode",
        choices=slurm.MODES,
        default="srun",
        help="srun: one `bigtx train` per SLURM task (default); deepspeed: DeepSpeed's launcher with a hostfile",
    )
    p.add_argument(
        "--grace",
        type=int,
        default=300,
        metavar="SECONDS",
        help="SIGUSR1 this long before the time limit: checkpoint and requeue (default 300)",
    )
    p.add_argument(
        "--exit-wait",
        type=int,
        default=300,
        metavar="SECONDS",
        help="after one rank exits, end the others after this long (srun --wait; 0: never; default 300)",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="export this for every rank, e.g. --env GLOO_SOCKET_IFNAME=eth0 (repeatable)",
    )
    p.add_argument(
        "--sbatch-option",
        action="append",
        default=[],
        metavar="OPTION",
        help="extra #SBATCH line, e.g. --sbatch-option=--qos=high (repeatable)",
    )
    p.add_argument("--job-name", help="SLURM job name (default bigtx-<run.name>)")
    p.add_argument(
        "--python",
        default=sys.executable,
        help=f"interpreter with bigtx installed on the nodes (default {sys.executable})",
    )
    p.add_argument(
        "--template", type=Path, default=None, help=f"batch script template (default {slurm.default_template()})"
    )
    p.add_argument(
        "--exclude-stuck-node",
        action="store_true",
        help="when the ranks fail and `bigtx doctor` finds a rank stuck, resubmit the script without its node",
    )
    p.add_argument("--submit", action="store_true", help="submit with sbatch and print the job id")
    p.set_defaults(func=_slurm)


def _slurm_data(args: argparse.Namespace) -> int:
    from bigtx.launch import slurm_data

    opts = slurm_data.DataJobOptions(
        inputs=args.input,
        tokenizer=args.tokenizer,
        out=args.out,
        parts=args.parts,
        parts_dir=args.parts_dir,
        shard_size=args.shard_size,
        val_fraction=args.val_fraction,
        text_field=args.text_field,
        overwrite=args.overwrite,
        cpus=args.cpus_per_task,
        max_running=args.max_running,
        partition=args.partition,
        time=args.time,
        account=args.account,
        sbatch_options=args.sbatch_option,
        python=args.python,
        job_name=args.job_name,
    )
    try:
        files = slurm_data.write_data_launch(opts)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    print(f"parts:  {files.parts_script} (array 1-{opts.parts}; part directories {files.parts_dir}/part-I)")
    print(f"merge:  {files.merge_script} (writes {files.out})")
    print(f"logs:   {files.parts_dir / 'logs'}")
    if not args.submit:
        submit = (
            f"jid=$(sbatch --parsable {files.parts_script}) && sbatch --dependency=afterok:$jid {files.merge_script}"
        )
        print(f"submit: {submit}")
        return 0
    try:
        array_id, merge_id = slurm_data.submit_data(files)
    except RuntimeError as exc:
        print(f"bigtx: error: {exc}", file=sys.stderr)
        return 1
    print(f"submitted parts as array job {array_id}, the merge as job {merge_id} (after every part succeeds)")
    return 0


def _add_slurm_data(lsub: argparse._SubParsersAction) -> None:
    helptext = (
        "render (and --submit) a `bigtx data build` across nodes: a SLURM job array of --parts tasks, each "
        "building one --part, and a merge job after them; the result is the single-process build byte for byte"
    )
    p = lsub.add_parser(
        "slurm-data", help="build tokenized shards across nodes with a SLURM job array", description=helptext
    )
    p.add_argument("--input", nargs="+", required=True, metavar="PATH_OR_GLOB", help="as for `bigtx data build`")
    p.add_argument("--tokenizer", required=True, metavar="T", help="`byte` or a tokenizer.json")
    p.add_argument("--out", required=True, metavar="DIR", help="where the merge writes the shards and index.json")
    p.add_argument("--parts", type=int, required=True, metavar="N", help="array tasks, one part of the inputs each")
    p.add_argument("--parts-dir", default=None, metavar="DIR", help="part directories and scripts (default OUT.parts)")
    p.add_argument("--shard-size", default=None, metavar="SIZE", help="as for `bigtx data build`")
    p.add_argument("--val-fraction", type=float, default=0.01, metavar="F", help="as for `bigtx data build`")
    p.add_argument("--text-field", default="text", help="as for `bigtx data build` (default: text)")
    p.add_argument("--overwrite", action="store_true", help="the merge replaces a build already in OUT")
    p.add_argument(
        "--cpus-per-task", type=int, default=8, metavar="C", help="CPUs per array task = tokenizer workers (default 8)"
    )
    p.add_argument("--max-running", type=int, default=None, metavar="K", help="array tasks running at once")
    p.add_argument("--partition", help="SLURM partition")
    p.add_argument("--time", metavar="HH:MM:SS", help="time limit per task (SLURM format)")
    p.add_argument("--account", help="SLURM account to charge")
    p.add_argument(
        "--sbatch-option", action="append", default=[], metavar="OPTION", help="extra #SBATCH line (repeatable)"
    )
    p.add_argument("--job-name", default="bigtx-data", help="SLURM job name prefix (default bigtx-data)")
    p.add_argument("--python", default=sys.executable, help=f"interpreter with bigtx on the nodes ({sys.executable})")
    p.add_argument("--submit", action="store_true", help="submit the array and the merge with sbatch")
    p.set_defaults(func=_slurm_data)


def _add_local(lsub: argparse._SubParsersAction) -> None:
    helptext = "train on this machine with N ranks through DeepSpeed's launcher; exits with the ranks' code"
    p = lsub.add_parser("local", help=helptext, description=helptext)
    add_spec_args(p)
    p.add_argument("--nproc", type=int, default=1, metavar="N", help="ranks to start: one per GPU, or CPU processes")
    p.add_argument("--master-port", type=int, default=29500, help="rendezvous port on this machine (default 29500)")
    p.add_argument("--bind-cores", action="store_true", help="pin each rank to its share of the CPU cores (numactl)")
    p.add_argument("--python", default=sys.executable, help=f"interpreter to run (default {sys.executable})")
    p.add_argument("--dry-run", action="store_true", help="print the launcher command instead of running it")
    p.set_defaults(func=_local)


def register(sub: argparse._SubParsersAction) -> None:
    launch = sub.add_parser("launch", help="start training (or a data build) on a SLURM cluster or on this machine")
    lsub = launch.add_subparsers(dest="launch_command", metavar="SUBCOMMAND")
    lsub.required = True
    _add_slurm(lsub)
    _add_slurm_data(lsub)
    _add_local(lsub)

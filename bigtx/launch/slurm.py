"""Render the SLURM batch script of a run from ``launchers/slurm/bigtx.sbatch.tmpl``, and submit it.

The template is plain bash with ``{{field}}`` placeholders; everything cluster-specific it needs
comes from ``SlurmOptions``. Rendering writes two files into ``RUN_DIR/launch/``: the resolved
spec (``bigtx-<name>.yaml``, overrides baked in, so a requeued job trains exactly the same
run) and the script (``bigtx-<name>.sbatch``) that trains it.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from bigtx.config import RunSpec, spec_to_dict
from bigtx.config.loading import shipped_dir

MODES = ("srun", "deepspeed")
_FIELD = re.compile(r"\{\{(\w+)\}\}")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# SLURM takes --signal=...@SECONDS up to 65535
MAX_GRACE = 65535


def default_template() -> Path:
    """The sbatch template shipped with bigtx (``launchers/slurm/`` of the checkout, or of the wheel)."""
    return shipped_dir("launchers") / "slurm" / "bigtx.sbatch.tmpl"


@dataclass
class SlurmOptions:
    """What the batch script asks SLURM for and how it starts the ranks."""

    nodes: int = 1
    gpus_per_node: int = 1  # also the number of ranks (tasks) per node
    gres: bool = True  # request --gres=gpu:G; off for CPU clusters
    partition: str | None = None
    time: str | None = None  # SLURM time limit, e.g. 24:00:00 or 2-00:00:00
    account: str | None = None
    cpus_per_task: int | None = None
    mode: Literal["srun", "deepspeed"] = "srun"
    grace: int = 300  # seconds before the time limit at which SIGUSR1 asks for a checkpoint
    exit_wait: int = 300  # seconds srun gives the other ranks once one has exited
    env: dict[str, str] = field(default_factory=dict)  # exported for every rank
    sbatch_options: list[str] = field(default_factory=list)  # extra #SBATCH lines, e.g. --qos=high
    python: str = sys.executable
    job_name: str | None = None
    # after the ranks failed, resubmit without the node of a rank `bigtx doctor` finds stuck
    exclude_stuck_node: bool = False

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def check(self) -> None:
        """Raise ``ValueError`` naming the option that is wrong."""
        if self.nodes < 1:
            raise ValueError(f"--nodes: must be at least 1, got {self.nodes}")
        if self.gpus_per_node < 1:
            raise ValueError(f"--gpus-per-node: must be at least 1 (one rank per GPU), got {self.gpus_per_node}")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise ValueError(f"--cpus-per-task: must be at least 1, got {self.cpus_per_task}")
        if self.mode not in MODES:
            raise ValueError(f"--mode: {self.mode!r} is not one of {', '.join(MODES)}")
        if not 0 < self.grace <= MAX_GRACE:
            raise ValueError(f"--grace: must be 1..{MAX_GRACE} seconds, got {self.grace}")
        if self.exit_wait < 0:
            raise ValueError(f"--exit-wait: must be >= 0 seconds (0: wait for every rank), got {self.exit_wait}")
        if self.time is not None:
            limit = time_limit_seconds(self.time)
            if limit is not None and limit <= self.grace:
                raise ValueError(
                    f"--grace: {self.grace}s is not shorter than --time {self.time} ({limit}s); "
                    "the checkpoint signal would come before the job starts"
                )
        for key in self.env:
            if not _ENV_KEY.fullmatch(key):
                raise ValueError(f"--env: {key!r} is not a valid variable name")
        for opt in self.sbatch_options:
            if not opt.startswith("-") or "\n" in opt:
                raise ValueError(f"--sbatch-option: {opt!r} is not an sbatch option such as --qos=high")
        for name, value in (("--partition", self.partition), ("--account", self.account)):
            if value is not None and (not value or any(c.isspace() for c in value)):
                raise ValueError(f"{name}: {value!r} must be a non-empty word")


def time_limit_seconds(text: str) -> int | None:
    """Seconds in a SLURM time limit (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS); None if unlimited."""
    text = text.strip()
    if text.upper() in ("UNLIMITED", "INFINITE"):
        return None
    days, sep, rest = text.partition("-")
    if not sep:
        days, rest = "0", text
    parts = rest.split(":")
    if not all(p.isdigit() for p in [days, *parts]) or len(parts) > 3:
        raise ValueError(f"--time: {text!r} is not a SLURM time such as 24:00:00 or 2-00:00:00")
    nums = [int(p) for p in parts]
    if sep:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = (nums + [0, 0])[:3]
    elif len(nums) == 3:  # HH:MM:SS
        hours, minutes, seconds = nums
    else:  # MM or MM:SS
        hours, minutes, seconds = 0, nums[0], (nums + [0])[1]
    return int(days) * 86400 + hours * 3600 + minutes * 60 + seconds


def env_pairs(items: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings (as given to --env) into a dict; raises ``ValueError``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--env: expected KEY=VALUE, e.g. --env GLOO_SOCKET_IFNAME=eth0; got {item!r}")
        out[key] = value
    return out


def bigtx_script(python: str) -> Path:
    """The ``bigtx`` console script installed next to ``python`` (mode deepspeed runs it as a file)."""
    return Path(python).parent / "bigtx"


def sbatch_lines(opts: SlurmOptions) -> list[str]:
    lines = []
    if opts.gres:
        lines.append(f"--gres=gpu:{opts.gpus_per_node}")
    if opts.cpus_per_task is not None:
        lines.append(f"--cpus-per-task={opts.cpus_per_task}")
    if opts.partition:
        lines.append(f"--partition={opts.partition}")
    if opts.account:
        lines.append(f"--account={opts.account}")
    if opts.time:
        lines.append(f"--time={opts.time}")
    lines += opts.sbatch_options
    return [f"#SBATCH {line}" for line in lines]


def fill_template(template: str, values: dict[str, str]) -> str:
    """Replace each ``{{field}}``; drop lines that hold only an empty field. Unknown fields are errors."""
    unknown = sorted(set(_FIELD.findall(template)) - set(values))
    if unknown:
        raise ValueError(f"template: unknown field(s) {', '.join('{{' + u + '}}' for u in unknown)}")
    out = []
    for line in template.splitlines():
        only = _FIELD.fullmatch(line.strip())
        if only and values[only.group(1)] == "":
            continue
        out.append(_FIELD.sub(lambda m: values[m.group(1)], line))
    return "\n".join(out) + "\n"


def render_script(
    template: str,
    opts: SlurmOptions,
    *,
    run_dir: Path,
    spec_path: Path,
    workdir: Path,
    job_name: str,
    script_path: Path,
) -> str:
    """The batch script for ``opts``, to be written to ``script_path``; paths must be absolute."""
    opts.check()
    paths = (("run.dir", run_dir), ("spec", spec_path), ("working directory", workdir), ("script", script_path))
    for name, path in paths:
        if not path.is_absolute():
            raise ValueError(f"{name}: {path} must be absolute")
        # #SBATCH lines and DeepSpeed's --launcher_args are split on white space
        if any(c.isspace() for c in str(path)):
            raise ValueError(f"{name}: {str(path)!r} contains white space, which #SBATCH lines cannot hold")
    exports = [f"export {key}={shlex.quote(value)}" for key, value in opts.env.items()]
    values = {
        "job_name": job_name,
        "nodes": str(opts.nodes),
        "tasks_per_node": str(opts.gpus_per_node),
        "sbatch_options": "\n".join(sbatch_lines(opts)),
        "workdir": str(workdir),
        "run_dir": str(run_dir),
        "grace": str(opts.grace),
        "run_dir_q": shlex.quote(str(run_dir)),
        "spec_q": shlex.quote(str(spec_path)),
        "python_q": shlex.quote(opts.python),
        "bigtx_script_q": shlex.quote(str(bigtx_script(opts.python))),
        "mode": opts.mode,
        "exit_wait": str(opts.exit_wait),
        "env_exports": "\n".join(exports),
        "exclude_stuck_node": str(int(opts.exclude_stuck_node)),
        "script_q": shlex.quote(str(script_path)),
    }
    return fill_template(template, values)


@dataclass
class LaunchFiles:
    script: Path
    spec: Path
    run_dir: Path


def launch_files(spec: RunSpec, workdir: Path) -> LaunchFiles:
    """Where the rendered files of ``spec`` go: ``RUN_DIR/launch/bigtx-<name>.{sbatch,yaml}``."""
    run_dir = (workdir / spec.run.dir).resolve()
    stem = "bigtx-" + re.sub(r"[^A-Za-z0-9_.-]", "_", spec.run.name)
    return LaunchFiles(run_dir / "launch" / f"{stem}.sbatch", run_dir / "launch" / f"{stem}.yaml", run_dir)


def write_launch(
    spec: RunSpec, opts: SlurmOptions, *, workdir: Path | None = None, template: Path | None = None
) -> LaunchFiles:
    """Write the resolved spec and the batch script into ``RUN_DIR/launch/`` (and create ``RUN_DIR/logs``).

    ``run.dir`` and relative paths in the spec stay as given: the job runs in ``workdir``
    (``#SBATCH --chdir``), the directory they were written relative to.
    """
    workdir = (workdir or Path.cwd()).resolve()
    template = template or default_template()
    if not template.is_file():
        raise ValueError(f"--template: {template} not found (a source checkout has launchers/slurm/bigtx.sbatch.tmpl)")
    if opts.mode == "deepspeed" and not bigtx_script(opts.python).is_file():
        raise ValueError(
            f"--mode deepspeed: DeepSpeed's slurm launcher runs a script file, and {bigtx_script(opts.python)} "
            "(the bigtx console script next to --python) does not exist"
        )
    files = launch_files(spec, workdir)
    job_name = opts.job_name or files.script.stem
    text = render_script(
        template.read_text(),
        opts,
        run_dir=files.run_dir,
        spec_path=files.spec,
        workdir=workdir,
        job_name=job_name,
        script_path=files.script,
    )
    files.script.parent.mkdir(parents=True, exist_ok=True)
    (files.run_dir / "logs").mkdir(parents=True, exist_ok=True)  # SLURM does not create --output's folder
    files.spec.write_text(
        f"# Resolved run spec written by `bigtx launch slurm`; {files.script.name} trains it.\n"
        + yaml.safe_dump(spec_to_dict(spec), sort_keys=False)
    )
    files.script.write_text(text)
    files.script.chmod(0o755)
    return files


def submit(script: Path, sbatch: str = "sbatch") -> int:
    """``sbatch`` the script; return the job id. Raises ``RuntimeError`` with sbatch's message."""
    try:
        proc = subprocess.run([sbatch, "--parsable", str(script)], capture_output=True, text=True)
    except FileNotFoundError:
        raise RuntimeError(f"{sbatch} not found: is this a SLURM login node?") from None
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch failed ({proc.returncode}): {proc.stderr.strip()}")
    # --parsable prints "jobid" or "jobid;cluster"
    return int(proc.stdout.strip().split(";")[0])

"""`bigtx launch slurm-data`: a data build across nodes as a SLURM job array plus a merge job.

Renders ``launchers/slurm/data-parts.sbatch.tmpl`` (array task I runs ``bigtx data build ... --part I/N``)
and ``data-merge.sbatch.tmpl`` (``bigtx data merge``) into ``PARTS_DIR/launch/``; ``--submit`` submits the
array, then the merge with ``--dependency=afterok`` on it. Every task gets the same ``--input`` strings
(globs are expanded by bigtx, not the shell) and runs in the directory the command ran in, so the parts
are the parts of one plan.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bigtx.launch.slurm import SlurmOptions, fill_template, sbatch_lines, submit
from bigtx.launch.slurm import default_template as _train_template

PARTS_TEMPLATE = "data-parts.sbatch.tmpl"
MERGE_TEMPLATE = "data-merge.sbatch.tmpl"


@dataclass
class DataJobOptions:
    """The build (as `bigtx data build` takes it) and what the jobs ask SLURM for."""

    inputs: list[str]
    tokenizer: str
    out: str
    parts: int
    parts_dir: str | None = None  # default: OUT.parts
    shard_size: str | None = None
    val_fraction: float = 0.01
    text_field: str = "text"
    overwrite: bool = False  # the merge replaces a build already in OUT
    cpus: int = 8  # per array task: --cpus-per-task and the tokenizer --workers
    max_running: int | None = None  # array tasks at once (--array=1-N%K)
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    sbatch_options: list[str] = field(default_factory=list)
    python: str = sys.executable
    job_name: str = "bigtx-data"

    def check(self) -> None:
        """Raise ``ValueError`` naming the option that is wrong (the inputs and tokenizer included)."""
        from bigtx.data.build import parse_size
        from bigtx.data.errors import DataError
        from bigtx.data.inputs import expand_inputs
        from bigtx.data.tokenizer import load_tokenizer

        if self.parts < 1:
            raise ValueError(f"--parts: must be at least 1, got {self.parts}")
        if self.cpus < 1:
            raise ValueError(f"--cpus-per-task: must be at least 1, got {self.cpus}")
        if self.max_running is not None and self.max_running < 1:
            raise ValueError(f"--max-running: must be at least 1, got {self.max_running}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction: {self.val_fraction} is not in [0, 1)")
        if not self.job_name or any(c.isspace() for c in self.job_name):
            raise ValueError(f"--job-name: {self.job_name!r} must be a non-empty word")
        # the same checks as `bigtx launch slurm` for the shared options
        self._slurm().check()
        try:
            if self.shard_size is not None:
                parse_size(self.shard_size)
            expand_inputs(self.inputs)  # the files must be there now; the tasks expand the same strings
            load_tokenizer(self.tokenizer)
        except DataError as exc:
            raise ValueError(str(exc)) from None

    def _slurm(self) -> SlurmOptions:
        return SlurmOptions(
            gres=False,
            partition=self.partition,
            time=self.time,
            account=self.account,
            sbatch_options=self.sbatch_options,
            grace=1,
            python=self.python,
        )


@dataclass
class DataLaunchFiles:
    parts_script: Path
    merge_script: Path
    parts_dir: Path
    out: Path


def _build_args(opts: DataJobOptions) -> str:
    args = ["--input", *opts.inputs, "--tokenizer", opts.tokenizer, "--val-fraction", repr(opts.val_fraction)]
    args += ["--text-field", opts.text_field]
    if opts.shard_size is not None:
        args += ["--shard-size", opts.shard_size]
    return " ".join(shlex.quote(a) for a in args)


def render_data_scripts(opts: DataJobOptions, *, parts_dir: Path, out: Path, workdir: Path) -> tuple[str, str]:
    """The array script and the merge script; paths must be absolute and free of white space."""
    opts.check()
    for name, path in (("--parts-dir", parts_dir), ("--out", out), ("working directory", workdir)):
        if not path.is_absolute():
            raise ValueError(f"{name}: {path} must be absolute")
        if any(c.isspace() for c in str(path)):
            raise ValueError(f"{name}: {str(path)!r} contains white space, which #SBATCH lines cannot hold")
    values = {
        "job_name": opts.job_name,
        "parts": str(opts.parts),
        "array_limit": "" if opts.max_running is None else f"%{opts.max_running}",
        "cpus": str(opts.cpus),
        "sbatch_options": "\n".join(sbatch_lines(opts._slurm())),
        "workdir": str(workdir),
        "parts_dir": str(parts_dir),
        "parts_dir_q": shlex.quote(str(parts_dir)),
        "out": str(out),
        "out_q": shlex.quote(str(out)),
        "python_q": shlex.quote(opts.python),
        "build_args": _build_args(opts),
        "overwrite": " --overwrite" if opts.overwrite else "",
    }
    folder = _train_template().parent
    return (
        fill_template((folder / PARTS_TEMPLATE).read_text(), values),
        fill_template((folder / MERGE_TEMPLATE).read_text(), values),
    )


def write_data_launch(opts: DataJobOptions, *, workdir: Path | None = None) -> DataLaunchFiles:
    """Write both scripts into ``PARTS_DIR/launch/`` and create ``PARTS_DIR/logs`` (SLURM does not)."""
    workdir = (workdir or Path.cwd()).resolve()
    out = (workdir / opts.out).resolve()
    parts_dir = (workdir / (opts.parts_dir or f"{opts.out.rstrip('/')}.parts")).resolve()
    parts_text, merge_text = render_data_scripts(opts, parts_dir=parts_dir, out=out, workdir=workdir)
    launch = parts_dir / "launch"
    launch.mkdir(parents=True, exist_ok=True)
    (parts_dir / "logs").mkdir(exist_ok=True)
    files = DataLaunchFiles(launch / "data-parts.sbatch", launch / "data-merge.sbatch", parts_dir, out)
    for path, text in ((files.parts_script, parts_text), (files.merge_script, merge_text)):
        path.write_text(text)
        path.chmod(0o755)
    return files


def submit_data(files: DataLaunchFiles, sbatch: str = "sbatch") -> tuple[int, int]:
    """Submit the array, then the merge after it; the two job ids. Raises ``RuntimeError``."""
    array_id = submit(files.parts_script, sbatch)
    try:
        proc = subprocess.run(
            [sbatch, "--parsable", f"--dependency=afterok:{array_id}", str(files.merge_script)],
            capture_output=True,
            text=True,
        )
    except FileNotFoundError:
        raise RuntimeError(f"{sbatch} not found: is this a SLURM login node?") from None
    if proc.returncode != 0:
        raise RuntimeError(
            f"sbatch of the merge failed ({proc.returncode}): {proc.stderr.strip()}; the parts run as job {array_id}: "
            f"submit it yourself with sbatch --dependency=afterok:{array_id} {files.merge_script}"
        )
    return array_id, int(proc.stdout.strip().split(";")[0])

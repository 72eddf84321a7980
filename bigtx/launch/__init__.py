"""Launchers: a SLURM batch script (`bigtx launch slurm`) and DeepSpeed's local launcher (`bigtx launch local`).

Both start ``bigtx train`` on every rank; neither imports the trainer. `bigtx launch slurm-data`
(``slurm_data``) runs a data build across nodes as a SLURM job array.
"""

from bigtx.launch.local import local_command
from bigtx.launch.slurm import SlurmOptions, render_script, submit, write_launch

__all__ = ["SlurmOptions", "local_command", "render_script", "submit", "write_launch"]

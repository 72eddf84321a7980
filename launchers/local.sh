#!/usr/bin/env bash
# Train on this machine with N ranks through DeepSpeed's launcher: what `bigtx launch local` runs.
#
#   launchers/local.sh N SPEC [--set KEY=VALUE ...]
#
# N is one rank per GPU; on a CPU-only machine DeepSpeed starts N processes all the same.
# The exit code is the ranks': 0 finished, 75 checkpointed after SIGUSR1/SIGTERM (run the same
# command again to resume), anything else an error. Unlike `bigtx launch local`, this script does
# not pass SIGUSR1 on: signal the rank processes themselves. PYTHON and MASTER_PORT may be set.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 NPROC SPEC [--set KEY=VALUE ...]" >&2
  exit 2
fi
nproc=$1
shift
# --module runs `python -m bigtx train ...`; --no_local_rank: bigtx reads LOCAL_RANK from the environment
exec "${PYTHON:-python3}" -u -m deepspeed.launcher.runner --num_gpus "$nproc" --master_port "${MASTER_PORT:-29500}" \
  --module --no_local_rank bigtx train "$@"

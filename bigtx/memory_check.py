"""The memory plan of a run on the devices this process sees: one summary line and, if it will not
fit, a warning (``bigtx config show`` and the start of ``bigtx train``)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import torch

from bigtx.config import ModelSection, RunSpec
from bigtx.config.memory_plan import Cluster, gb, plan


def host_memory() -> int:
    """Physical memory of this machine in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_report(
    spec: RunSpec,
    world_size: int,
    local_world_size: int,
    zero_config: Mapping[str, Any] | None,
    teacher: ModelSection | None = None,
) -> tuple[str, str | None]:
    """(summary line, warning or None) for ``spec`` on ``world_size`` ranks, ``local_world_size`` per node
    (``teacher``: the model section of its distillation teacher, counted too).

    With CUDA the cluster has this machine's GPU memory (device 0) and host memory. On the CPU there is
    no GPU to check: each rank's device figures live in the host's memory too, so the host check counts
    them for every local rank. Raises ``ValueError`` when the batch sizes do not fit the world size.
    """
    per_node = max(1, min(local_world_size, world_size))
    nodes = math.ceil(world_size / per_node)
    host = host_memory()
    if torch.cuda.is_available():
        cluster = Cluster(nodes, per_node, torch.cuda.get_device_properties(0).total_memory, host)
        result = plan(spec, cluster, zero_config, suggest=False, teacher=teacher)
        summary = result.summary()
        fits = result.fits
    else:
        cluster = Cluster(nodes, per_node, host, host)
        result = plan(spec, cluster, zero_config, suggest=False, device="cpu", teacher=teacher)
        needed = result.per_gpu.total * per_node + result.per_node_host.total
        fits = needed <= host
        summary = (
            f"memory plan ({nodes}x{per_node} ranks on the CPU, ZeRO-{result.stage}, micro-batch "
            f"{result.micro_batch_size}): {gb(result.per_gpu.total)} per rank, {gb(needed)} of {gb(host)} "
            f"on this host: {'fits' if fits else 'does NOT fit'} (no GPU to check)"
        )
    warning = None
    if not fits:
        warning = (
            f"the memory plan says this run will not fit ({summary}); "
            f"`bigtx plan SPEC --nodes {nodes} --gpus-per-node {per_node}` lists changes that would"
        )
    return summary, warning

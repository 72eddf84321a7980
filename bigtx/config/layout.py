"""Checks of the zero section that need the job's layout: world size, ranks per node, CUDA.

Pure: the caller says what it knows. ``bigtx train`` checks with its own environment before any
process group starts; ``bigtx launch local|slurm`` checks with the layout it is about to launch,
so that a wrong layout fails on the login node instead of in the job.
"""

from __future__ import annotations

from bigtx.config.spec import ZeroSection


def check_layout(zero: ZeroSection, world_size: int, ranks_per_node: int, cuda_available: bool) -> None:
    """Raise ``ValueError`` naming the ``zero.*`` field and the fix if the layout cannot run it."""
    hpz = zero.hpz_partition_size
    if hpz > 1:
        if world_size % hpz:
            raise ValueError(
                f"zero.hpz_partition_size: {hpz} does not divide the world size {world_size}; "
                f"set it to the ranks per node ({ranks_per_node}) or to 1 (off)"
            )
        # DeepSpeed groups ranks [0..h-1], [h..2h-1], ...: with h = ranks per node each group is
        # one node, and the forward's all-gathers of the secondary copy never leave it
        if hpz != ranks_per_node:
            raise ValueError(
                f"zero.hpz_partition_size: {hpz} is not the number of ranks (GPUs) per node ({ranks_per_node}); "
                f"set it to {ranks_per_node} so that each secondary copy lives inside one node, or to 1 (off)"
            )
    if not cuda_available:
        # DeepSpeed 0.19.8 quantizes with QuantizerBuilder's CUDA kernels; its CPU accelerator has no such op
        for name in ("quantized_weights", "quantized_gradients"):
            if getattr(zero, name):
                raise ValueError(
                    f"zero.{name}: ZeRO++ quantization runs on CUDA kernels only and this job has no GPU; "
                    f"set zero.{name}=false"
                )

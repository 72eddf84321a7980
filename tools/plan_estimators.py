"""The planner's model states against DeepSpeed's own estimators, raw and corrected.

    python tools/plan_estimators.py [--out bench_results/plan_estimators.json]

DeepSpeed 0.19.8's ``estimate_zero2_model_states_mem_needs`` and ``estimate_zero3_model_states_mem_needs``
with bigtx's inputs (parameters, largest module, cluster shape, offload, ``zero_init`` = partitioned
build) and ``additional_buffer_factor=1`` (the planner counts its buffers itself). ``deepspeed_estimate``
also returns them corrected where the estimator is wrong; each correction says why.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bigtx.config import load_spec
from bigtx.config.memory_plan import DEEPSPEED_ZERO_DEFAULTS, STAGE3_PARTITIONED_BUILD, Cluster, largest_module
from bigtx.config.memory_plan import model_states as planned_states

PRESETS = ("llama-125m", "llama-1.3b", "llama-7b", "llama-13b", "llama-70b")
CLUSTERS = ((1, 1), (1, 8), (2, 8), (8, 8), (16, 8))
SETTINGS = ((2, False, False), (2, True, False), (3, False, False), (3, True, False), (3, True, True))


def deepspeed_estimate(name: str, nodes: int, gpus: int, stage: int, opt: bool, params: bool) -> dict[str, int]:
    """DeepSpeed's (per GPU, per node's host) estimate, raw and corrected."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    m = load_spec(name).model
    P, L, N = m.num_params(), largest_module(m), nodes * gpus
    if stage == 2:
        host, gpu = estimate_zero2_model_states_mem_needs(P, gpus, nodes, cpu_offload=opt, additional_buffer_factor=1)
        fixed_gpu, fixed_host = gpu, host
        if opt:
            # Bug: the offload branch uses max(4 * total_gpus, 16) * P per node. The fp32 model built on
            # each rank is 4 * P * gpus_per_node (as its own non-offload branch says), and the offloaded
            # fp32 states (16 bytes/param) are spread over all nodes.
            fixed_host = max(4 * P * gpus, 16 * P // nodes)
    else:
        host, gpu, _ = estimate_zero3_model_states_mem_needs(
            P,
            L,
            gpus,
            nodes,
            cpu_offload=opt,
            cpu_offload_params=params,
            zero_init=STAGE3_PARTITIONED_BUILD,
            additional_buffer_factor=1,
        )
        fixed_gpu, fixed_host = gpu, host
        # Omission: the 16-bit gradient partition (stage3.py:791 grad_partitions_flat_buffer, 2 bytes per
        # param / N) is counted nowhere; it sits on the GPU, or pinned on the host with optimizer offload.
        # And the fp32 gradient of the step exists one sub-group (1e9 elements) at a time (stage3.py:2686).
        part = -(-P // N)
        if opt:
            # the host side omits the build too, which the no-offload branch counts: one module's fp32
            # weights per rank under zero.Init
            fixed_host = max(host + 2 * part * gpus, 4 * L * gpus)
        else:
            fixed_gpu = gpu + 2 * part - 4 * max(0, part - DEEPSPEED_ZERO_DEFAULTS["sub_group_size"])
    return {"gpu": int(gpu), "host": int(host), "fixed_gpu": int(fixed_gpu), "fixed_host": int(fixed_host)}


def compare(name: str, nodes: int, gpus: int, stage: int, opt: bool, params: bool) -> dict:
    """The planner's figures and DeepSpeed's for one case, with the ratios planner / DeepSpeed."""
    gpu, host = planned_states(load_spec(name).model, "bf16", stage, opt, params, Cluster(nodes, gpus, 1, 1))
    ours = {"gpu": gpu.params + gpu.grads + gpu.optimizer, "host": host.total}
    ds = deepspeed_estimate(name, nodes, gpus, stage, opt, params)
    return {
        "preset": name,
        "nodes": nodes,
        "gpus_per_node": gpus,
        "stage": stage,
        "offload_optimizer": opt,
        "offload_params": params,
        "planner": ours,
        "deepspeed": ds,
        "gpu_ratio": ours["gpu"] / ds["gpu"],
        "host_ratio": ours["host"] / ds["host"],
        "gpu_ratio_fixed": ours["gpu"] / ds["fixed_gpu"],
        "host_ratio_fixed": ours["host"] / ds["fixed_host"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_results/plan_estimators.json")
    args = parser.parse_args()
    rows = [compare(n, *c, *s) for n in PRESETS for c in CLUSTERS for s in SETTINGS]
    print("planner / DeepSpeed estimator, model states; raw and corrected (min..max over presets and clusters)")
    print(f"{'setting':<28} {'GPU raw':>13} {'host raw':>13} {'GPU fixed':>13} {'host fixed':>13}")
    for stage, opt, params in SETTINGS:
        sel = [r for r in rows if (r["stage"], r["offload_optimizer"], r["offload_params"]) == (stage, opt, params)]
        label = f"ZeRO-{stage}" + (" offload opt" if opt else "") + (" + params" if params else "")
        cells = []
        for key in ("gpu_ratio", "host_ratio", "gpu_ratio_fixed", "host_ratio_fixed"):
            values = [r[key] for r in sel]
            cells.append(f"{min(values):.3f}..{max(values):.3f}")
        print(f"{label:<28} " + " ".join(f"{c:>13}" for c in cells))
    worst = max(abs(r[k] - 1) for r in rows for k in ("gpu_ratio_fixed", "host_ratio_fixed"))
    print(
        f"{len(rows)} cases ({', '.join(PRESETS)} x {len(CLUSTERS)} clusters); largest deviation from the "
        f"corrected estimators {worst:.1%}"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Derive the DeepSpeed JSON from the run spec.

The spec is the single source of truth. A reviewed base file from ``ds_configs/`` may add
settings the spec has no field for (bucket sizes, overlap); a base value that contradicts what
the spec derives is an error, never silently overridden.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bigtx.config.loading import shipped_dir
from bigtx.config.spec import RunSpec

# Large enough that DeepSpeed never prints its own per-step lines; bigtx logs the metrics.
_QUIET_STEPS = 2**31 - 1
# ZeRO++ keys the spec owns (zero.hpz_partition_size, zero.quantized_*) but derives only when on:
# a base file must not switch them on behind the spec and its layout checks.
_ZEROPP_KEYS = ("zero_hpz_partition_size", "zero_quantized_weights", "zero_quantized_gradients")
# ZeRO-3's gradient bucket, in elements, unless a base file sets one. DeepSpeed allocates the bucket
# whole (stage3.py, the IPG buffer) and reduces only when it is full, so its default of 5e8 holds
# every gradient of a model under 500M parameters at once: up to 1 GB per rank in bf16 on top of the
# model states (a 273M model on 4 CPU ranks peaked at 2.73x its states, 2.00x with this size:
# tools/bench_memory.py). 25M elements (50 MB in bf16) is about the size PyTorch DDP and Megatron-LM
# bucket gradients with, enough for the reduction to run at full bandwidth; a model smaller than
# that still reduces once per step, as with the default.
ZERO3_REDUCE_BUCKET = 25_000_000


def ds_configs_dir() -> Path:
    """Where named base configs live: $BIGTX_DS_CONFIGS, else the ds_configs/ shipped with bigtx."""
    env = os.environ.get("BIGTX_DS_CONFIGS")
    return Path(env) if env else shipped_dir("ds_configs")


def resolve_base_path(base: str) -> Path:
    path = Path(base)
    if path.suffix == ".json" or path.exists():
        candidates = [path]
    else:
        candidates = [ds_configs_dir() / f"{base}.json"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    folder = ds_configs_dir()
    names = sorted(p.stem for p in folder.glob("*.json"))
    raise ValueError(
        f"deepspeed.base: {base!r} not found; name one of {names} (the files in {folder}) or give a path to a JSON file"
    )


def _load_base(base: str | None) -> tuple[dict[str, Any], str]:
    if base is None:
        return {}, ""
    path = resolve_base_path(base)
    try:
        return json.loads(path.read_text()), str(path)
    except json.JSONDecodeError as exc:
        raise ValueError(f"deepspeed.base: {path} is not valid JSON (line {exc.lineno}, column {exc.colno})") from None


def _derived(spec: RunSpec, world_size: int) -> dict[str, Any]:
    micro, accum, glob = spec.batch_sizes(world_size)
    # offload devices are always spelled out so that a base file cannot switch them on behind the spec
    zero: dict[str, Any] = {
        "stage": spec.zero.stage,
        "offload_optimizer": {"device": "cpu" if spec.zero.offload_optimizer else "none"},
    }
    if spec.zero.stage == 3:
        zero["offload_param"] = {"device": "cpu" if spec.zero.offload_params else "none"}
        # bigtx builds the model inside deepspeed.zero.Init (bigtx.zero3), which would otherwise replace
        # torch.nn.functional.linear for the whole process with DeepSpeed's own version
        zero["memory_efficient_linear"] = False
    # ZeRO++ keys only when on, so that the DeepSpeed config of a run without it is unchanged
    if spec.zero.hpz_partition_size > 1:
        zero["zero_hpz_partition_size"] = spec.zero.hpz_partition_size
    if spec.zero.quantized_weights:
        zero["zero_quantized_weights"] = True
    if spec.zero.quantized_gradients:
        zero["zero_quantized_gradients"] = True
    cfg: dict[str, Any] = {
        "train_batch_size": glob,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": spec.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": spec.precision == "bf16"},
        "fp16": {"enabled": spec.precision == "fp16"},
        # bigtx sets the learning rate itself every step (see bigtx.optim.schedule), so that a
        # resumed run follows the same curve; DeepSpeed gets no scheduler.
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": spec.optim.lr,
                "betas": [spec.optim.beta1, spec.optim.beta2],
                "eps": spec.optim.eps,
                "weight_decay": spec.optim.weight_decay,
                # torch's AdamW: DeepSpeed's fused CPU Adam rounds differently once a checkpoint is
                # reloaded (its SIMD path depends on the buffer's alignment), which breaks exact resume
                "torch_adam": not _cuda_available(),
            },
        },
        "steps_per_print": _QUIET_STEPS,
        "wall_clock_breakdown": False,
        # needed so `bigtx ckpt universal` can re-shard a checkpoint for a new world size
        "checkpoint": {"load_universal": False},
    }
    if not _cuda_available() and spec.zero.stage >= 1:
        # torch's AdamW steps tensor by tensor by default, holding two temporaries the size of the tensor
        # (sqrt(v) and its quotient), and ZeRO 1-3 hand it one flat fp32 partition per group: a 273M bf16
        # ZeRO-3 model on 4 ranks peaked in the optimizer step (2 x 262 MB over the states), 1.97-1.99x its
        # states per rank (tools/bench_memory.py). torch's fused CPU kernel holds none and is the fastest
        # (65.5M elements, one thread: 88 ms; foreach 354, per tensor 462). It rounds differently from the
        # other two (1 ulp in 0.07% of elements after 3 steps) but alike for any alignment and thread count
        # (tests/unit/test_spec.py), so resumes stay exact. DeepSpeed passes `fused` through to
        # torch.optim.AdamW (checked against 0.19.8). Under ZeRO-0 the tensors are the parameters: unchanged.
        cfg["optimizer"]["params"]["fused"] = True
    if spec.precision == "fp16":
        cfg["fp16"].update(
            {
                "loss_scale": 0,
                "initial_scale_power": 16,
                "loss_scale_window": 1000,
                "hysteresis": 2,
                "min_loss_scale": 1,
            }
        )
    return cfg


def _cuda_available() -> bool:
    import torch  # here, not at the top: the memory planner imports this module without torch

    return torch.cuda.is_available()


def _contradictions(base: Any, derived: Any, path: str = "") -> list[str]:
    """Keys present in both with different values (dicts compared recursively)."""
    if isinstance(base, dict) and isinstance(derived, dict):
        out = []
        for key in base.keys() & derived.keys():
            out += _contradictions(base[key], derived[key], f"{path}.{key}" if path else key)
        return out
    return [] if base == derived else [f"{path}: base has {json.dumps(base)}, spec derives {json.dumps(derived)}"]


def _merge(base: dict[str, Any], derived: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in derived.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def derive_deepspeed_config(spec: RunSpec, world_size: int, load_universal: bool = False) -> dict[str, Any]:
    """The exact dict handed to ``deepspeed.initialize`` for this spec and world size.

    Raises ``ValueError`` (naming ``deepspeed.base`` and the keys) if the base file contradicts
    the spec, and for batch sizes that do not fit the world size.
    """
    base, base_path = _load_base(spec.deepspeed.base)
    zeropp = sorted(set(_ZEROPP_KEYS) & set(base.get("zero_optimization", {})))
    if zeropp:
        raise ValueError(
            f"deepspeed.base: {base_path} sets {', '.join(zeropp)}; delete them from the base file and set "
            "ZeRO++ through the spec (zero.hpz_partition_size, zero.quantized_weights, zero.quantized_gradients)"
        )
    derived = _derived(spec, world_size)
    # the optimizer block's lr/weight decay are defaults, per-group values come from bigtx.optim
    clashes = _contradictions({k: v for k, v in base.items() if k != "checkpoint"}, derived)
    if clashes:
        raise ValueError(
            f"deepspeed.base: {base_path} contradicts the run spec; set these through the spec "
            "(zero.*, train.*, precision, optim.*) and delete them from the base file: " + "; ".join(sorted(clashes))
        )
    cfg = _merge(base, derived)
    if spec.zero.stage == 3:
        cfg["zero_optimization"].setdefault("reduce_bucket_size", ZERO3_REDUCE_BUCKET)
    cfg["checkpoint"] = {**base.get("checkpoint", {}), "load_universal": load_universal}
    return cfg


def derive_teacher_config(student: dict[str, Any]) -> dict[str, Any]:
    """The DeepSpeed config of a sharded distillation teacher, from the student's derived ``student``
    config: ZeRO-3 with no optimizer (DeepSpeed then builds its inference-only ``DeepSpeedZeRoOffload``),
    in the student's precision, with the student's ZeRO-3 settings (parameter offload, hpZ, buckets)
    when it runs ZeRO-3 itself."""
    zero = dict(student["zero_optimization"]) if student["zero_optimization"]["stage"] == 3 else {}
    zero.pop("offload_optimizer", None)
    zero.update(stage=3, memory_efficient_linear=False)
    zero.setdefault("offload_param", {"device": "none"})
    keep = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "bf16", "fp16")
    return {
        **{k: student[k] for k in keep},
        "zero_optimization": zero,
        "steps_per_print": _QUIET_STEPS,
        "wall_clock_breakdown": False,
    }

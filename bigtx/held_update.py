"""An optimizer update held back until the step is judged: the one module that reaches into DeepSpeed's
optimizers for it. Checked against DeepSpeed 0.19.8, for ZeRO 0-3 in bf16 and fp32 without offload (the
spec refuses ``stability`` with fp16 and with ``zero.offload_optimizer``; ``check`` refuses any other
optimizer wrapper).

After the last backward pass of a step the gradients are reduced (ZeRO-2/3: partitioned) but not yet
applied. ``grad_norm`` computes the global norm there with DeepSpeed's own routine for the optimizer
wrapper in use, the same number DeepSpeed clips with inside ``engine.step()``. ``skip`` then runs
``engine.step()`` with the wrapped torch optimizer's ``step`` left out: DeepSpeed still clears the
gradients and its buffers, copies the unchanged fp32 master weights back to the model's (so they are
unchanged too), and advances its micro-step counter (the data moves on); the weights, the optimizer's
moments and step counts are untouched, and DeepSpeed's ``global_steps`` / ``global_samples`` are set
back, so the engine is as if the step had never run. (bigtx sets the learning rate itself from its
own step count, and DeepSpeed has no scheduler.)
"""

from __future__ import annotations

from typing import Any

import torch

from bigtx.config import SpecError


def check(engine: Any) -> None:
    """Raise ``SpecError`` unless ``engine``'s optimizer wrapper is one ``grad_norm`` and ``skip`` were
    checked with (ZeRO 0-3 in bf16 and fp32, as bigtx configures them)."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    checked = (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3, FP16_UnfusedOptimizer, torch.optim.Optimizer)
    if not isinstance(engine.optimizer, checked):
        wrapper = type(engine.optimizer).__name__
        raise SpecError(
            [
                f"stability: DeepSpeed wraps the optimizer in {wrapper} here, which bigtx cannot skip a step of "
                "exactly; drop the stability section (checked: ZeRO 0-3 in bf16 and fp32, no offload)"
            ]
        )


def grad_norm(engine: Any) -> float:
    """Collective (ZeRO >= 1 all-reduces inside). The L2 norm of the step's reduced gradients before
    clipping; call after the step's last ``engine.backward`` and before ``engine.step``."""
    from deepspeed.moe.utils import split_params_grads_into_shared_and_expert_params
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.utils import combine_grad_norm_groups, get_global_norm, get_weight_norm
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = engine.optimizer
    if isinstance(opt, DeepSpeedZeroOptimizer):
        norm = opt.scaled_global_norm()  # loss scale 1: bf16 and fp32
    elif isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
        norm = combine_grad_norm_groups(opt._get_norm_groups())
    elif isinstance(opt, FP16_UnfusedOptimizer):
        # ZeRO-0 bf16: bf16 model weights, fp32 master copies; the gradients are all-reduced
        groups = [split_params_grads_into_shared_and_expert_params(group)[0] for group in opt.fp16_groups]
        norms = [get_weight_norm(grads, mpu=opt.mpu) if grads else 0.0 for grads in groups]
        norm = get_global_norm(norm_list=norms) / opt.loss_scale_config.cur_scale
    else:
        # ZeRO-0 fp32: DeepSpeed hands the torch optimizer over as it is; the gradients are all-reduced
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
    return float(norm)


def _no_update(*args: Any, **kwargs: Any) -> None:
    return None


def skip(engine: Any) -> None:
    """``engine.step()`` at the accumulation boundary without applying the update (see the module docstring)."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO and ZeRO-0 bf16 wrap the torch one
    steps, samples = engine.global_steps, engine.global_samples
    inner.step = _no_update  # an instance attribute: hides the class's step for this one call
    try:
        engine.step()
    finally:
        del inner.step
    engine.global_steps, engine.global_samples = steps, samples

"""ZeRO-3 partitioned construction (``bigtx.zero3``) on 2 gloo ranks with real DeepSpeed: the gathered
weights are exactly the unpartitioned build's, the first step matches ZeRO-2 and exactly the old
whole-model build's, and a checkpoint of the whole build loads into the partitioned one."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch

from bigtx import zero3
from bigtx.config import load_spec
from bigtx.config.deepspeed_config import derive_deepspeed_config
from bigtx.model import Transformer
from bigtx.optim import param_groups
from tests.harness import run_ranks

pytestmark = pytest.mark.slow

WORLD = 2
CASES = {
    "fp32": [],
    "tied": ["model.tie_embeddings=true"],
    "qknorm-bias-layernorm": ["model.qk_norm=true", "model.bias=true", "model.norm=layernorm"],
    "sinusoidal-gelu": ["model.position=sinusoidal", "model.mlp=gelu"],
    "bf16-sinusoidal": ["precision=bf16", "model.position=sinusoidal"],
}


def _rank(rank: int, world: int, fn, *args) -> None:  # noqa: ANN001
    """Run ``fn`` on this rank with DeepSpeed's process group; leave without interpreter teardown,
    where DeepSpeed's C++ threads can abort the process after a passing test."""
    import deepspeed

    from bigtx.distributed import skip_shm_comm_op

    skip_shm_comm_op()
    deepspeed.init_distributed(dist_backend="gloo")
    fn(rank, world, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spec(*overrides: str):  # noqa: ANN202
    return load_spec("tiny", ["precision=fp32", "train.micro_batch_size=2", "train.grad_accum=1", *overrides])


def _gathered(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    import deepspeed

    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return {name: p.detach().clone() for name, p in model.named_parameters()}


def _check_build(rank: int, world: int, init_from: str | None) -> None:
    from bigtx.train import build_model

    for name, overrides in CASES.items():
        spec = _spec("zero.stage=3", *overrides, *([f"model.init_from={init_from}"] if init_from else []))
        ds_config = derive_deepspeed_config(spec, world)
        model = build_model(spec, rank, world, ds_config, fresh=True)
        reference = Transformer(spec.model)
        reference.init_weights(spec.run.seed)
        if init_from:
            from bigtx.model.weights import load_weights

            load_weights(reference, init_from)
        dtype = torch.bfloat16 if spec.precision == "bf16" else torch.float32
        expected = {n: p.detach().to(dtype) for n, p in reference.named_parameters()}
        got = _gathered(model)
        assert list(got) == list(expected), name
        for key in expected:
            assert torch.equal(got[key], expected[key]), f"{name}: {key} differs from the unpartitioned build"
        for key, p in model.named_parameters():
            assert zero3.is_partitioned(p) and p.numel() == 0, f"{name}: {key} is held whole"
            assert p.ds_tensor.numel() == math.ceil(math.prod(p.ds_shape) / world), f"{name}: {key} partition"
        groups = [[id(p) for p in g["params"]] for g in param_groups(model, spec.optim, shape_of=zero3.full_shape)]
        ids = {id(p): n for n, p in model.named_parameters()}
        ref_ids = {id(p): n for n, p in reference.named_parameters()}
        ref_groups = [[ref_ids[id(p)] for p in g["params"]] for g in param_groups(reference, spec.optim)]
        assert [[ids[i] for i in g] for g in groups] == ref_groups, f"{name}: weight-decay groups"
        assert len(ref_groups[0]) > 0
        if spec.model.position == "sinusoidal":
            assert torch.equal(model.pos_table, reference.pos_table), f"{name}: position table"


def test_partitioned_build_gathers_to_the_unpartitioned_weights() -> None:
    run_ranks(_rank, WORLD, _check_build, None, init=False, timeout=120)


def test_partitioned_build_loads_init_from(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = Transformer(_spec().model)
    model.init_weights(seed=7)  # another seed than the run's: the file's weights must win
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    run_ranks(_rank, WORLD, _check_init_from, str(tmp_path), init=False, timeout=120)


def _check_init_from(rank: int, world: int, path: str) -> None:
    from bigtx.train import build_model

    spec = _spec("zero.stage=3", f"model.init_from={path}")
    model = build_model(spec, rank, world, derive_deepspeed_config(spec, world), fresh=True)
    reference = Transformer(spec.model)
    reference.init_weights(seed=7)
    got = _gathered(model)
    for key, p in reference.named_parameters():
        assert torch.equal(got[key], p.detach()), f"init_from: {key}"


def _batch(rank: int, spec) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    gen = torch.Generator().manual_seed(100 + rank)
    tokens = torch.randint(0, spec.model.vocab_size, (2, 33), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def _engine(spec, rank: int, world: int, whole: bool = False):  # noqa: ANN001, ANN202
    """A DeepSpeed engine as bigtx builds it; ``whole``: as bigtx built it before partitioned
    construction (the whole fp32 model on every rank, partitioned by the engine)."""
    import deepspeed

    from bigtx.train import build_model

    ds_config = derive_deepspeed_config(spec, world)
    if whole:
        model = Transformer(spec.model)
        model.init_weights(spec.run.seed)
    else:
        model = build_model(spec, rank, world, ds_config, fresh=True)
    groups = param_groups(model, spec.optim, shape_of=zero3.full_shape)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    return engine


def _check_first_step(rank: int, world: int) -> None:
    results = {}
    for stage in (3, 2):
        spec = _spec(f"zero.stage={stage}", "model.tie_embeddings=true")
        engine = _engine(spec, rank, world)
        x, y = _batch(rank, spec)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        module = engine.module
        weights = _gathered(module) if stage == 3 else {n: p.detach().clone() for n, p in module.named_parameters()}
        results[stage] = (loss.item(), weights)
    assert results[3][0] == results[2][0], f"step-1 loss: ZeRO-3 {results[3][0]!r}, ZeRO-2 {results[2][0]!r}"
    for key, value in results[2][1].items():
        # DeepSpeed's ZeRO-3 optimizer itself steps ~2e-6 away from ZeRO-2's (the same with the whole
        # build; measured on 1 and 2 ranks); that construction changes nothing is checked exactly below
        diff = (results[3][1][key] - value).abs().max().item()
        assert diff <= 1e-5, f"{key}: ZeRO-3 and ZeRO-2 differ by {diff} after step 1"


def test_first_step_matches_zero2() -> None:
    run_ranks(_rank, WORLD, _check_first_step, init=False, timeout=120)


def _step(engine, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:  # noqa: ANN001
    engine.backward(engine(x, y))
    engine.step()
    return _gathered(engine.module)


def _check_old_checkpoint(rank: int, world: int, root: str) -> None:
    spec = _spec("zero.stage=3")
    x, y = _batch(rank, spec)
    old = _engine(spec, rank, world, whole=True)
    expected = _step(old, x, y)
    old.save_checkpoint(root, tag="old")
    expected_loss = old(x, y).item()

    new = _engine(spec, rank, world)
    stepped = _step(new, x, y)
    for key, value in expected.items():
        assert torch.equal(stepped[key], value), f"{key} after one step: the partitioned build differs from the whole"
    new.load_checkpoint(root, tag="old", load_lr_scheduler_states=False)
    got = _gathered(new.module)
    for key, value in expected.items():
        assert torch.equal(got[key], value), f"{key} after loading the whole-build checkpoint"
    assert new(x, y).item() == expected_loss


def test_checkpoint_of_the_whole_build_loads_into_the_partitioned_build(tmp_path: Path) -> None:
    run_ranks(_rank, WORLD, _check_old_checkpoint, str(tmp_path), init=False, timeout=120)

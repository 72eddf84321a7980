"""The memory planner: its model states against DeepSpeed's estimators, its activations against what
autograd saves, fitting and suggestions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bigtx.config import load_spec
from bigtx.config.deepspeed_config import derive_deepspeed_config
from bigtx.config.memory_plan import (
    Cluster,
    activation_bytes,
    checkpointed_blocks,
    document_bias_bytes,
    held_gathered_params,
    largest_module,
    layer_activation_bytes,
    model_states,
    module_params,
    plan,
    saved_activation_bytes,
)
from bigtx.config.spec import ModelSection
from bigtx.model.documents import find_documents
from bigtx.model.transformer import Transformer
from tools.plan_estimators import CLUSTERS, PRESETS, SETTINGS, compare

GB = 10**9
VARIANTS = [
    {},
    {"n_kv_heads": 2},
    {"mlp": "gelu", "norm": "layernorm", "bias": True, "position": "learned", "tie_embeddings": True},
    {"qk_norm": True},
    {"norm_placement": "post"},
    {"position": "sinusoidal"},
]


def small(**overrides: object) -> ModelSection:
    return ModelSection(d_model=128, n_heads=4, d_ff=352, vocab_size=1000, **overrides)


@pytest.mark.parametrize("overrides", VARIANTS)
def test_parameter_tensors_add_up_to_the_model(overrides: dict) -> None:
    cfg = small(**overrides)
    model = Transformer(cfg)
    assert sum(n * sum(sizes) for n, sizes in module_params(cfg)) == cfg.num_params()
    with_own = [sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()]
    assert largest_module(cfg) == max(with_own)  # DeepSpeed's model_to_params() reads it this way


def _saved_bytes(cfg: ModelSection, dtype: torch.dtype, batch: int, seq: int, documents: bool = False) -> int:
    """Bytes of the distinct storages autograd saves in a forward with targets (parameters and the
    input ids, alive anyway, left out); with ``documents``, of packed rows with document masking."""
    model = Transformer(cfg).to(dtype)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    targets = torch.randint(0, cfg.vocab_size, (batch, seq))
    ids[:, seq // 3] = 0  # an EOS: two documents per row
    docs = find_documents(ids, eos_id=0) if documents else None
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()} | {ids.untyped_storage().data_ptr()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, targets, documents=docs)
    return sum(seen.values())


@pytest.mark.parametrize("overrides", VARIANTS)
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_saved_activations_are_exactly_what_autograd_saves(overrides: dict, precision: str) -> None:
    cfg = small(**overrides)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    assert saved_activation_bytes(cfg, 2, 64, precision) == _saved_bytes(cfg, dtype, 2, 64)


@pytest.mark.parametrize("overrides", VARIANTS)
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_document_masking_saves_one_shared_mask_and_per_row_positions(overrides: dict, precision: str) -> None:
    """data.document_mask on the CPU (SDPA) path: one [B, 1, T, T] mask for all layers, RoPE tables and
    learned positions per row."""
    cfg = small(**overrides)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    planned = saved_activation_bytes(cfg, 2, 64, precision, documents=True, device="cpu")
    assert planned == _saved_bytes(cfg, dtype, 2, 64, documents=True)
    mask = (2 if precision == "bf16" else 4) * 2 * 64 * 64
    act = 2 if precision == "bf16" else 4
    assert document_bias_bytes(cfg, 2, 64, act, documents=True, device="cpu") == mask
    assert planned - saved_activation_bytes(cfg, 2, 64, precision) >= mask
    # on CUDA in 16 bits the variable-length kernel needs no mask
    assert document_bias_bytes(cfg, 2, 64, 2, documents=True, device="cuda") == 0


def test_checkpointing_keeps_block_inputs_and_recomputes_one_block() -> None:
    m = load_spec("llama-7b").model  # activation_checkpointing: every
    none = m.model_copy(update={"activation_checkpointing": "none"})
    every4 = m.model_copy(update={"activation_checkpointing": 4})  # blocks 0, 4, ..., 28: 8 of 32
    n, L = 8 * 2048, 32
    layer, block_input = layer_activation_bytes(m, 8, 2048, 2), 2 * n * m.d_model
    head = saved_activation_bytes(m, 8, 2048, "bf16") - L * layer  # final norm, head input, logits, targets
    loss_chunks, grads_in_flight = 2 * 256 * 2**20, 2 * n * (2 * m.d_model + 3 * m.d_ff)
    # without checkpointing the end of the forward is the peak; with it, the last block's recompute;
    # every 4th: the last block (31) keeps its tensors, the head's and the loss's outweigh its gradients
    assert activation_bytes(none, 8, 2048, "bf16") == L * layer + head + loss_chunks
    assert activation_bytes(m, 8, 2048, "bf16") == L * block_input + layer - block_input + grads_in_flight
    blocks4 = 8 * block_input + 24 * layer
    assert activation_bytes(every4, 8, 2048, "bf16") == blocks4 + head + loss_chunks
    assert (L * layer, layer, head) == (106_406_346_752, 3_325_198_336, 1_719_894_024)


# ---------------------------------------------------------------------------------------------
# Model states against DeepSpeed 0.19.8's estimators.


ESTIMATOR_CASES = [(n, *c, *s) for n in PRESETS for c in CLUSTERS for s in SETTINGS]


@pytest.mark.parametrize(("name", "nodes", "gpus", "stage", "opt", "params"), ESTIMATOR_CASES)
def test_model_states_agree_with_deepspeed_estimators(
    name: str, nodes: int, gpus: int, stage: int, opt: bool, params: bool
) -> None:
    """Within 10% of the estimators corrected where they are wrong (tools/plan_estimators.py says why)."""
    row = compare(name, nodes, gpus, stage, opt, params)
    assert abs(row["gpu_ratio_fixed"] - 1) <= 0.10 and abs(row["host_ratio_fixed"] - 1) <= 0.10
    if stage == 2 and (not opt or nodes == 1):  # where DeepSpeed's own estimate is right, within 10% of it
        assert abs(row["gpu_ratio"] - 1) <= 0.10 and abs(row["host_ratio"] - 1) <= 0.10


def test_the_raw_stage3_estimate_misses_two_bytes_per_partitioned_param() -> None:
    """The correction above, pinned down: llama-7b on 1x8, ZeRO-3, no offload."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    m = load_spec("llama-7b").model
    P, L = m.num_params(), largest_module(m)
    _, ds_gpu, _ = estimate_zero3_model_states_mem_needs(P, L, 8, 1, cpu_offload=False, additional_buffer_factor=1)
    gpu, _ = model_states(m, "bf16", 3, False, False, Cluster(1, 8, GB, GB))
    persistent = 2 * (2 * m.n_layers + 1) * m.d_model  # the norm weights stay whole on every rank
    assert gpu.params + gpu.grads + gpu.optimizer - ds_gpu == 2 * (-(-P // 8)) + persistent


# ---------------------------------------------------------------------------------------------
# Figures, fitting and suggestions.


def test_stage2_builds_the_fp32_model_on_every_rank_and_stage3_one_module() -> None:
    m = load_spec("llama-7b").model
    _, host2 = model_states(m, "bf16", 2, False, False, Cluster(1, 8, GB, GB))
    _, host3 = model_states(m, "bf16", 3, False, False, Cluster(1, 8, GB, GB))
    assert host2.build == 4 * 6_738_415_616 * 8  # 215.6 GB just to build
    assert host3.build == 4 * 32000 * 4096 * 8  # the embedding, drawn in fp32 by each rank


def test_bucket_sizes_from_the_deepspeed_config_are_used() -> None:
    m = load_spec("llama-7b").model
    default, _ = model_states(m, "bf16", 3, False, False, Cluster(1, 8, GB, GB))
    zero3 = {"reduce_bucket_size": 50_000_000, "stage3_prefetch_bucket_size": 50_000_000}  # ds_configs/zero3.json
    small_buckets, _ = model_states(m, "bf16", 3, False, False, Cluster(1, 8, GB, GB), zero3)
    # the gradient bucket twice (it and the flat copy reduced from it), the prefetch bucket once
    assert default.buffers == 2 * (2 * 25_000_000 + 50_000_000)  # deepspeed_config.ZERO3_REDUCE_BUCKET
    assert small_buckets.buffers == 2 * (2 * 50_000_000 + 50_000_000)


def test_a_stage_change_plans_with_that_stages_buckets() -> None:
    """A ZeRO-3 base file's buckets do not carry over to a ZeRO-1 plan: DeepSpeed's 5e8 apply."""
    spec = load_spec("llama-7b", ["deepspeed.base=zero3"])
    derived = derive_deepspeed_config(spec, 8)["zero_optimization"]
    stage1, _ = model_states(spec.model, "bf16", 1, False, False, Cluster(1, 8, GB, GB), derived)
    defaults, _ = model_states(
        spec.model, "bf16", 1, False, False, Cluster(1, 8, GB, GB), {"overlap_comm": derived["overlap_comm"]}
    )
    assert derived["reduce_bucket_size"] == 50_000_000 and stage1.buffers == defaults.buffers


@pytest.mark.parametrize("ac", ["none", 2, "every"])
@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_zero3_counts_the_linear_weights_a_forward_keeps_gathered(ac: str | int, mlp: str) -> None:
    """Every nn.Linear weight of a block that is not checkpointed (the head is the gathered module)."""
    spec = load_spec("tiny", ["model.n_layers=5", f"model.mlp={mlp}", f"model.activation_checkpointing={ac}"])
    recomputed = checkpointed_blocks(spec.model)
    assert recomputed == {"none": [False] * 5, 2: [True, False, True, False, True], "every": [True] * 5}[ac]
    model = Transformer(spec.model)
    expected = sum(
        mod.weight.numel()
        for i, block in enumerate(model.blocks)
        if not recomputed[i]
        for mod in block.modules()
        if isinstance(mod, torch.nn.Linear)
    )
    assert held_gathered_params(spec.model) == expected
    cluster = Cluster(1, 2, 80 * GB, 10**12)
    params = {
        stage: plan(
            load_spec(
                "tiny",
                [
                    "model.n_layers=5",
                    f"model.mlp={mlp}",
                    f"model.activation_checkpointing={ac}",
                    f"zero.stage={stage}",
                ],
            ),
            cluster,
            suggest=False,
        ).per_gpu.params
        for stage in (2, 3)
    }
    states3, _ = model_states(spec.model, "bf16", 3, False, False, cluster)
    assert params[3] == states3.params + 2 * expected  # bf16: two bytes per held weight
    states2, _ = model_states(spec.model, "bf16", 2, False, False, cluster)
    assert params[2] == states2.params  # ZeRO-2 holds the whole model anyway


def test_llama_70b_fits_eight_nodes_and_suggests_three_from_one() -> None:
    spec = load_spec("llama-70b")
    fits = plan(spec, Cluster(8, 8, 80 * GB, 10**12))
    assert fits.fits and fits.suggestions == []
    parts = fits.to_dict()["per_gpu"]
    assert parts["total"] == sum(parts[k] for k in ("params", "grads", "optimizer", "activations", "buffers"))
    one = plan(spec, Cluster(1, 8, 80 * GB, 10**12))
    assert not one.fits and not one.fits_gpu and one.fits_host
    # 24 ranks: the global batch of 1024 becomes the nearest multiple of 24, with the same micro-batch 1
    assert [(s.nodes, s.overrides) for s in one.suggestions] == [
        (3, {"train.micro_batch_size": 1, "train.grad_accum": 43, "train.global_batch_size": 1032})
    ]
    any_batch = load_spec("llama-70b", ["train.global_batch_size=null"])
    assert plan(any_batch, Cluster(2, 8, 80 * GB, 10**12)).per_gpu.total > 80 * GB  # 3 is the minimum


def test_suggestions_are_ordered_and_each_fits() -> None:
    spec = load_spec("llama-7b", ["zero.stage=0"])
    cluster = Cluster(1, 8, 80 * GB, 10**12)
    result = plan(spec, cluster)
    assert not result.fits
    changes = [s.overrides for s in result.suggestions]
    assert changes == [
        {"zero.stage": 1},
        {"zero.stage": 2},
        {"zero.stage": 3},
        {"zero.stage": 1, "zero.offload_optimizer": True},
        {"zero.stage": 3, "zero.offload_optimizer": True, "zero.offload_params": True},
    ]
    for s in result.suggestions:
        again = plan(load_spec("llama-7b", ["zero.stage=0"] + [f"{k}={v}" for k, v in s.overrides.items()]), cluster)
        assert again.fits and again.per_gpu.total == s.gpu_total


def test_a_smaller_micro_batch_keeps_the_global_batch() -> None:
    spec = load_spec("llama-7b", ["model.activation_checkpointing=none"])
    result = plan(spec, Cluster(1, 8, 80 * GB, 10**12))
    micro = [s for s in result.suggestions if "train.micro_batch_size" in s.overrides]
    assert len(micro) == 1
    o = micro[0].overrides
    assert o["train.micro_batch_size"] * o["train.grad_accum"] * 8 == o["train.global_batch_size"] == 1024
    # the next micro-batch that keeps the global batch (128 sequences per rank) does not fit
    larger_micro = next(b for b in range(o["train.micro_batch_size"] + 1, 129) if 128 % b == 0)
    larger = plan(
        load_spec(
            "llama-7b",
            [
                "model.activation_checkpointing=none",
                f"train.micro_batch_size={larger_micro}",
                "train.global_batch_size=null",
            ],
        ),
        Cluster(1, 8, 80 * GB, 10**12),
        suggest=False,
    )
    assert not larger.fits  # the largest micro-batch that fits


def test_when_nothing_alone_fits_combinations_and_nodes_are_suggested() -> None:
    result = plan(load_spec("llama-70b", ["zero.stage=2"]), Cluster(1, 8, 80 * GB, 10**12))
    assert [(s.overrides, s.nodes) for s in result.suggestions] == [
        ({"zero.stage": 3, "train.micro_batch_size": 1, "train.grad_accum": 43, "train.global_batch_size": 1032}, 3),
        ({"zero.stage": 3, "zero.offload_optimizer": True}, 2),
    ]


@pytest.mark.parametrize("field", ["nodes", "gpus_per_node", "gpu_memory", "host_memory"])
def test_a_cluster_needs_positive_sizes(field: str) -> None:
    args = {"nodes": 1, "gpus_per_node": 1, "gpu_memory": GB, "host_memory": GB, field: 0}
    with pytest.raises(ValueError, match=f"{field}: must be at least 1"):
        Cluster(**args)


def test_the_planner_imports_neither_torch_nor_deepspeed() -> None:
    code = "import sys, bigtx.config.memory_plan; print(sorted({'torch', 'deepspeed'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_run_that_fits_gets_the_cheaper_settings_that_fit_too() -> None:
    result = plan(load_spec("llama-7b"), Cluster(1, 8, 80 * GB, 10**12))
    assert result.fits and result.suggestions == []
    assert [s.overrides for s in result.faster] == [
        {"zero.stage": 1},  # the lowest stage that fits; ZeRO-0 needs 146 GB
        {"train.micro_batch_size": 32, "train.grad_accum": 4, "train.global_batch_size": 1024},
    ]
    assert not plan(load_spec("llama-7b", ["zero.stage=0"]), Cluster(1, 8, 80 * GB, 10**12)).fits
    # activation checkpointing off does not fit (109.5 GB of activations per GPU)
    assert not plan(load_spec("llama-7b", ["model.activation_checkpointing=none"]), Cluster(1, 8, 80 * GB, 10**12)).fits
    for s in result.faster:
        again = plan(
            load_spec("llama-7b", [f"{k}={v}" for k, v in s.overrides.items()]), Cluster(1, 8, 80 * GB, 10**12)
        )
        assert again.fits and again.per_gpu.total == s.gpu_total


def test_an_online_teacher_is_counted_whole_or_as_its_partition(tmp_path: Path) -> None:
    from bigtx.config.memory_plan import teacher_bytes

    teacher = ModelSection(preset="llama-7b")
    common = ["data.seq_len=2048", "train.micro_batch_size=1", "train.global_batch_size=64", "precision=bf16"]
    spec = load_spec("llama-1.3b", common)
    layer = layer_activation_bytes(teacher, 1, 2048, 2)
    logits = 2 * 2048 * teacher.vocab_size
    replicated = teacher_bytes(teacher, 1, 2048, "bf16", sharded=False, world_size=64)
    assert replicated == 2 * teacher.num_params() + layer + logits
    sharded = teacher_bytes(teacher, 1, 2048, "bf16", sharded=True, world_size=64)
    whole = 2 * (-(-teacher.num_params() // 64) + largest_module(teacher))
    assert whole < sharded - layer - logits < whole + 2 * 10**6  # plus the small parameters kept whole
    cluster = Cluster(8, 8, 80 * GB, 1000 * GB)
    plain = plan(spec, cluster, suggest=False)
    assert plain.per_gpu.teacher == 0
    assert plan(spec, cluster, suggest=False, teacher=teacher).per_gpu.teacher == 0  # no distill section
    for stage, expected in ((2, replicated), (3, sharded)):
        taught = load_spec("llama-1.3b", [*common, f"distill.teacher={tmp_path}", f"zero.stage={stage}"])
        with_teacher = plan(taught, cluster, suggest=False, teacher=teacher)
        assert with_teacher.per_gpu.teacher == expected
        assert with_teacher.per_gpu.total == plan(taught, cluster, suggest=False).per_gpu.total + expected
        assert with_teacher.to_dict()["per_gpu"]["teacher"] == expected

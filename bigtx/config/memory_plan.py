"""How much memory a run needs per GPU and per node's host, and the cheapest changes that make it fit.

Pure arithmetic on the run spec and a cluster shape: no torch, no DeepSpeed. The figures follow what
DeepSpeed 0.19.8 allocates (the file and line named at each term) and what bigtx's model saves for
the backward; ``tests/unit/test_memory_plan.py`` checks the model states against DeepSpeed's own
estimators and the activations against the tensors autograd saves, and ``tools/bench_plan.py`` the
activations against measured peaks.

Sizes are bytes. ``P`` is the parameter count, ``N`` the number of data-parallel ranks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from bigtx.config.deepspeed_config import ZERO3_REDUCE_BUCKET
from bigtx.config.spec import ModelSection, RunSpec

# Under ZeRO-3 bigtx builds the model inside deepspeed.zero.Init (partitioned construction), so no
# rank ever holds the whole model: the host needs one layer's fp32 init per rank, not the model.
STAGE3_PARTITIONED_BUILD = True

# DeepSpeed 0.19.8's defaults (deepspeed/runtime/zero/config.py) for what bigtx's derived config
# leaves unset; a `deepspeed.base` file may set them (ds_configs/zero3.json sets 5e7 buckets).
DEEPSPEED_ZERO_DEFAULTS: dict[str, int | bool] = {
    "reduce_bucket_size": 500_000_000,
    "allgather_bucket_size": 500_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_param_persistence_threshold": 100_000,
    "sub_group_size": 1_000_000_000,
}
# the engine's bucket for stage 0's gradient all-reduce (deepspeed/runtime/config.py ALLREDUCE_BUCKET_SIZE)
STAGE0_ALLREDUCE_BUCKET = 500_000_000
# bigtx.model.loss: one fp32 chunk of logits (two such temporaries live at once)
LOSS_CHUNK_BYTES = {"cpu": 2 * 2**20, "cuda": 256 * 2**20}

CATEGORIES = ("params", "grads", "optimizer", "activations", "buffers", "teacher")


@dataclass(frozen=True)
class Cluster:
    """Where the run goes: ``nodes`` x ``gpus_per_node`` ranks, memory per GPU and per node's host."""

    nodes: int
    gpus_per_node: int
    gpu_memory: int
    host_memory: int

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node", "gpu_memory", "host_memory"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Memory:
    """Bytes by category; ``total`` is their sum (or the build's peak on the host, if higher)."""

    params: int = 0
    grads: int = 0
    optimizer: int = 0
    activations: int = 0
    buffers: int = 0
    teacher: int = 0  # an online distillation teacher: weights, forward and logits
    build: int = 0  # host only: peak while the model is built, before DeepSpeed takes over

    @property
    def total(self) -> int:
        return max(sum(getattr(self, c) for c in CATEGORIES), self.build)

    def to_dict(self, with_build: bool) -> dict[str, int]:
        # "teacher" only for a run with an online distillation teacher
        out = {c: getattr(self, c) for c in CATEGORIES if c != "teacher" or self.teacher}
        if with_build:
            out["build"] = self.build
        out["total"] = self.total
        return out


@dataclass(frozen=True)
class Suggestion:
    """A change to the spec (``--set`` pairs) and/or the node count, re-planned: it fits."""

    change: str
    overrides: dict[str, Any]
    nodes: int
    gpu_total: int
    host_total: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Plan:
    cluster: Cluster
    precision: str
    stage: int
    offload_optimizer: bool
    offload_params: bool
    activation_checkpointing: str | int
    micro_batch_size: int
    grad_accum: int
    per_gpu: Memory
    per_node_host: Memory
    suggestions: list[Suggestion] = field(default_factory=list)
    faster: list[Suggestion] = field(default_factory=list)  # when it fits: cheaper settings that fit too

    @property
    def fits_gpu(self) -> bool:
        return self.per_gpu.total <= self.cluster.gpu_memory

    @property
    def fits_host(self) -> bool:
        return self.per_node_host.total <= self.cluster.host_memory

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_host

    def summary(self) -> str:
        """One line: the totals against the memory, and whether it fits."""
        c = self.cluster
        offload = [n for n, on in (("optimizer", self.offload_optimizer), ("params", self.offload_params)) if on]
        return (
            f"memory plan ({c.nodes}x{c.gpus_per_node} GPUs, ZeRO-{self.stage}"
            f"{', offload ' + '+'.join(offload) if offload else ''}, micro-batch {self.micro_batch_size}): "
            f"{gb(self.per_gpu.total)} of {gb(c.gpu_memory)} per GPU, "
            f"{gb(self.per_node_host.total)} of {gb(c.host_memory)} per node's host: "
            + (
                "fits"
                if self.fits
                else "does NOT fit"
                + ("" if self.fits_gpu else " the GPUs")
                + ("" if self.fits_host else (" and" if not self.fits_gpu else "") + " the host")
            )
        )

    def to_dict(self) -> dict[str, Any]:
        c = self.cluster
        return {
            "cluster": asdict(c) | {"world_size": c.world_size},
            "precision": self.precision,
            "zero_stage": self.stage,
            "offload_optimizer": self.offload_optimizer,
            "offload_params": self.offload_params,
            "activation_checkpointing": self.activation_checkpointing,
            "micro_batch_size": self.micro_batch_size,
            "grad_accum": self.grad_accum,
            "per_gpu": self.per_gpu.to_dict(with_build=False),
            "per_node_host": self.per_node_host.to_dict(with_build=True),
            "fits_gpu": self.fits_gpu,
            "fits_host": self.fits_host,
            "fits": self.fits,
            "suggestions": [s.to_dict() for s in self.suggestions],
            "faster": [s.to_dict() for s in self.faster],
        }


def gb(n: int) -> str:
    """Bytes for people: GB (1e9) with one decimal, MB below 1 GB."""
    return f"{n / 1e9:,.1f} GB" if n >= 10**9 else f"{n / 1e6:,.1f} MB"


# --------------------------------------------------------------------------------------------
# The model's shapes.


def module_params(m: ModelSection) -> list[tuple[int, list[int]]]:
    """(how many, [numel of each parameter tensor]) for every kind of module with its own parameters.

    Mirrors ``bigtx.model.Transformer``; DeepSpeed's ZeRO-3 gathers parameters module by module, and
    keeps tensors below the persistence threshold whole on every rank.
    """
    d, f, kv, L = m.d_model, m.d_ff, m.kv_heads * m.head_dim, m.n_layers
    norm = [d, d] if (m.norm == "layernorm" and m.bias) else [d]
    head_norm = [m.head_dim] * len(norm)

    def linear(fan_in: int, fan_out: int) -> list[int]:
        return [fan_in * fan_out] + ([fan_out] if m.bias else [])

    out: list[tuple[int, list[int]]] = [(1, [m.vocab_size * d]), (1, norm), (2 * L, norm)]
    out += [(2 * L, linear(d, d)), (2 * L, linear(d, kv))]
    if m.qk_norm:
        out.append((2 * L, head_norm))
    if m.mlp == "swiglu":
        out += [(2 * L, linear(d, f)), (L, linear(f, d))]
    else:
        out += [(L, linear(d, f)), (L, linear(f, d))]
    if not m.tie_embeddings:
        out.append((1, [m.vocab_size * d]))
    if m.position == "learned":
        out.append((1, [m.max_seq_len * d]))
    return out


def largest_module(m: ModelSection) -> int:
    """Parameters of the largest module (DeepSpeed's ``largest_layer_params``)."""
    return max(sum(sizes) for _, sizes in module_params(m))


def persistent_params(m: ModelSection, threshold: int) -> int:
    """Parameters ZeRO-3 keeps whole on every rank (tensors of at most ``threshold`` elements)."""
    return sum(count * sum(s for s in sizes if s <= threshold) for count, sizes in module_params(m))


# --------------------------------------------------------------------------------------------
# Activations.


def _norm_saved(m: ModelSection, rows: int, dim: int, act: int) -> int:
    """Bytes a norm over ``dim`` features of ``rows`` rows keeps for the backward.

    bigtx's RMSNorm upcasts its input to fp32 (bigtx.model.layers) and ``F.rms_norm`` keeps its fp32
    input, the normalised fp32 rows, the fp32 rstd and (under 16 bits) an fp32 copy of the weight;
    in fp32 the saved input is the input tensor itself, which then stays alive. LayerNorm keeps its
    input, mean and rstd in the activation dtype. A residual-stream tensor that no norm keeps is
    freed after the add that consumes it, so nothing else counts it.
    """
    if m.norm == "layernorm":
        return act * rows * (dim + 2)
    return 8 * rows * dim + 4 * rows + (4 * dim if act < 4 else 0)


def layer_activation_bytes(m: ModelSection, micro_batch: int, seq_len: int, act: int, documents: bool = False) -> int:
    """Bytes one block keeps for its backward (what autograd saves in ``Block.forward``).

    ``act``: bytes per activation element (2 under bf16/fp16, which DeepSpeed casts the module to;
    4 in fp32). From bigtx.model.layers: the two norms, the attention input (shared by the q/k/v
    projections), the queries, keys, values, output and fp32 log-sum-exp that flash attention keeps
    (its output, laid out [B, T, H, hd], is the output projection's input without a copy), RoPE's
    cos/sin tables, the MLP input and its hidden tensors (SwiGLU: gate, silu(gate), up and their
    product; GELU: pre- and post-activation). Dropout adds a mask per residual branch; attention
    dropout (the math kernel, T x T per head) is not modelled. With ``documents`` (data.document_mask)
    RoPE's positions differ per row, so its tables are [B, T] rather than [T] positions.
    """
    d, kv, f = m.d_model, m.kv_heads * m.head_dim, m.d_ff
    n = micro_batch * seq_len
    total = 2 * _norm_saved(m, n, d, act)
    total += act * n * d  # attention input
    total += act * n * (2 * d + 2 * kv) + 4 * n * m.n_heads  # q, k, v, output; fp32 log-sum-exp
    if m.qk_norm:
        total += _norm_saved(m, n * m.n_heads, m.head_dim, act) + _norm_saved(m, n * m.kv_heads, m.head_dim, act)
    if m.position == "rope" and act < 4:
        positions = n if documents else seq_len
        total += 4 * positions * (m.head_dim // 2) * act  # (cos, sin) cast for q and for k
    total += act * n * d  # MLP input
    total += act * n * f * (4 if m.mlp == "swiglu" else 2)
    if m.dropout > 0:
        total += 2 * act * n * d
    return total


def _backward_working_set(m: ModelSection, tokens: int, act: int) -> int:
    """Gradients in flight while one block runs its backward: the residual's gradient (two copies
    across the add) and the MLP's hidden gradients, which are the largest."""
    return act * tokens * (2 * m.d_model + (3 if m.mlp == "swiglu" else 2) * m.d_ff)


def saved_activation_bytes(
    m: ModelSection, micro_batch: int, seq_len: int, precision: str, *, documents: bool = False, device: str = "cuda"
) -> int:
    """Bytes autograd holds at the end of the forward without activation checkpointing: every block's
    saved tensors, the final norm's, the head's input and the logits (which the loss keeps and
    overwrites with their gradient, bigtx.model.loss), the loss's targets, mask and count; in fp32
    RoPE's (cos, sin) tables, shared by every block; with ``documents`` the attention mask
    (``document_bias_bytes``)."""
    act = 4 if precision == "fp32" else 2
    n = micro_batch * seq_len
    positions = n if documents else seq_len
    outside = _norm_saved(m, n, m.d_model, act) + act * n * m.d_model + act * n * m.vocab_size + 9 * n + 8
    if m.position == "rope" and act == 4:
        outside += 2 * positions * (m.head_dim // 2) * 4
    if m.position == "learned":
        outside += 8 * positions  # the positions the embedding looks up
    outside += document_bias_bytes(m, micro_batch, seq_len, act, documents=documents, device=device)
    return m.n_layers * layer_activation_bytes(m, micro_batch, seq_len, act, documents) + outside


def document_bias_bytes(
    m: ModelSection, micro_batch: int, seq_len: int, act: int, *, documents: bool, device: str
) -> int:
    """The one [B, 1, T, T] additive attention mask that data.document_mask shares between all layers
    (bigtx.model.documents): none on CUDA with 16-bit activations and no dropout, where the
    variable-length kernel needs only the documents' offsets (``documents.uses_varlen``)."""
    if not documents or (device == "cuda" and act == 2 and m.dropout == 0):
        return 0
    return act * micro_batch * seq_len * seq_len


def checkpointed_blocks(m: ModelSection) -> list[bool]:
    """Per block, whether ``model.activation_checkpointing`` recomputes it (``every``, or every N-th
    block starting with block 0)."""
    ac = m.activation_checkpointing
    return [ac == "every" or (isinstance(ac, int) and i % ac == 0) for i in range(m.n_layers)]


def held_gathered_params(m: ModelSection) -> int:
    """Parameters a ZeRO-3 forward keeps gathered until the backward, beyond the module in use.

    bigtx leaves DeepSpeed's global ``F.linear`` replacement off (``memory_efficient_linear: false``),
    so autograd saves each linear layer's gathered weight for the backward, and DeepSpeed's release
    after the module's forward frees nothing while the graph holds it: every linear weight of a block
    that is not checkpointed stays gathered until that block's backward (a checkpointed block saves
    only its input, and gathers again when it recomputes). Measured on the CPU: a 273M-parameter
    ZeRO-3 bf16 model without checkpointing held its whole 16-bit model at the end of the forward.
    """
    d, f, kv = m.d_model, m.d_ff, m.kv_heads * m.head_dim
    per_block = 2 * d * d + 2 * d * kv + (3 if m.mlp == "swiglu" else 2) * d * f
    return per_block * sum(not c for c in checkpointed_blocks(m))


def activation_bytes(
    m: ModelSection, micro_batch: int, seq_len: int, precision: str, device: str = "cuda", documents: bool = False
) -> int:
    """Peak bytes of activations per rank for one micro-batch's forward and backward.

    The larger of two moments. At the end of the forward: every block's saved tensors (a checkpointed
    block keeps only its input), the head's and the loss's, and the loss's fp32 chunks. During the
    blocks' backward, once the head's tensors are freed: the blocks' saved tensors, the tensors a
    checkpointed block recomputes (one block at a time), and one block's gradients in flight; with
    ``documents`` (data.document_mask) the attention mask, alive until the first block's backward.
    Checked against measured peaks by tools/bench_plan.py.
    """
    act = 4 if precision == "fp32" else 2
    n = micro_batch * seq_len
    checkpointed = checkpointed_blocks(m)
    layer = layer_activation_bytes(m, micro_batch, seq_len, act, documents)
    block_input = act * n * m.d_model
    kept = [block_input if c else layer for c in checkpointed]
    saved = saved_activation_bytes(m, micro_batch, seq_len, precision, documents=documents, device=device)
    head = saved - m.n_layers * layer
    bias = document_bias_bytes(m, micro_batch, seq_len, act, documents=documents, device=device)
    end_of_forward = sum(kept) + head + 2 * LOSS_CHUNK_BYTES.get(device, LOSS_CHUNK_BYTES["cuda"])
    # the blocks run their backward last to first, freeing theirs: the largest moment is the last
    # block's, with all the others' tensors still kept and its own whole (recomputed if checkpointed)
    in_backward = sum(kept[:-1]) + layer + _backward_working_set(m, n, act) + bias
    return max(end_of_forward, in_backward)


def teacher_bytes(
    t: ModelSection,
    micro_batch: int,
    seq_len: int,
    precision: str,
    sharded: bool,
    world_size: int,
    zero_config: Mapping[str, Any] | None = None,
) -> int:
    """Per-rank bytes of an online distillation teacher ``t`` (an estimate, not yet checked against
    measured peaks): its weights in the run's precision (sharded: a 1/world_size partition, the module
    being computed gathered whole and the small parameters ZeRO-3 keeps whole), one layer's tensors at a
    time in its forward (nothing is kept for a backward), and its logits for one micro-batch, which the
    fused distillation loss keeps until the student's backward."""
    low = 4 if precision == "fp32" else 2
    P = t.num_params()
    if sharded:
        z = _zero_settings(zero_config, 3)
        weights = low * (
            math.ceil(P / world_size)
            + largest_module(t)
            + persistent_params(t, z["stage3_param_persistence_threshold"])
        )
    else:
        weights = low * P
    logits = low * micro_batch * seq_len * t.vocab_size
    return weights + layer_activation_bytes(t, micro_batch, seq_len, low) + logits


# --------------------------------------------------------------------------------------------
# Model states and buffers.


def _zero_settings(zero_config: Mapping[str, Any] | None, stage: int) -> dict[str, Any]:
    """Bucket sizes for ``stage``: DeepSpeed's defaults (bigtx's smaller gradient bucket for ZeRO-3),
    then ``zero_config``'s values when it was derived for the same stage (a suggestion that changes
    the stage plans with that stage's defaults, since a base file's buckets belong to its own stage)."""
    out: dict[str, Any] = dict(DEEPSPEED_ZERO_DEFAULTS)
    if stage == 3:
        out["reduce_bucket_size"] = ZERO3_REDUCE_BUCKET
    same_stage = zero_config is not None and zero_config.get("stage", stage) == stage
    for key in DEEPSPEED_ZERO_DEFAULTS:
        if same_stage and key in zero_config:  # type: ignore[operator]
            out[key] = int(zero_config[key])  # type: ignore[index]
    out["overlap_comm"] = (zero_config or {}).get("overlap_comm")
    return out


def model_states(
    m: ModelSection,
    precision: str,
    stage: int,
    offload_optimizer: bool,
    offload_params: bool,
    cluster: Cluster,
    zero_config: Mapping[str, Any] | None = None,
    device: str = "cuda",
) -> tuple[Memory, Memory]:
    """(per GPU, per node's host) params, grads, optimizer, buffers and the host's build peak.

    Mixed precision (bf16/fp16): 16-bit params and grads, fp32 master weights, fp32 Adam moments,
    and fp32 gradients for the optimizer step. fp32: the params are the master weights.
    """
    z = _zero_settings(zero_config, stage)
    P, N, g = m.num_params(), cluster.world_size, cluster.gpus_per_node
    low = 4 if precision == "fp32" else 2  # bytes of a model-dtype param/grad
    master = 0 if precision == "fp32" else 4
    part = math.ceil(P / N)
    L = largest_module(m)
    gpu: dict[str, int] = dict.fromkeys(CATEGORIES, 0)

    def bucket(elements: int) -> int:
        # DeepSpeed allocates its buckets whole (torch.empty); a GPU counts that, while on the CPU only
        # the pages written count, at most one element per parameter
        return min(elements, P) if device == "cpu" else elements

    host: dict[str, int] = dict.fromkeys(CATEGORIES, 0)  # per rank; times g below

    if stage == 0:
        # the whole model on every rank; bf16/fp16 run DeepSpeed's FP16_Optimizer (fp32 master and flat
        # fp32 grads of everything), fp32 runs plain torch AdamW
        gpu["params"] = low * P
        gpu["grads"] = low * P + (4 * P if master else 0)
        gpu["optimizer"] = (master + 8) * P
        gpu["buffers"] = low * bucket(STAGE0_ALLREDUCE_BUCKET)
    elif stage in (1, 2):
        # stage_1_and_2.py: 16-bit params whole; grads whole (stage 1) or their partition (stage 2) in
        # 16 bits; the fp32 partition of params/grads/moments on the GPU or, offloaded, on the host
        gpu["params"] = low * P
        grads16 = low * P if stage == 1 else low * part
        states = {"grads": 4 * part, "optimizer": (4 + 8) * part}
        if offload_optimizer:
            gpu["grads"] = low * P if stage == 1 else 0  # stage 2 copies each reduced bucket to the host
            host.update(states)
        else:
            gpu["grads"] = grads16 + states["grads"]
            gpu["optimizer"] = states["optimizer"]
        buckets = 2 if z["overlap_comm"] else 1
        gpu["buffers"] = low * bucket(z["reduce_bucket_size"]) * buckets
    else:
        # stage3.py: 16-bit param partition (fp16_partitioned_groups_flat), the 16-bit gradient
        # partition (grad_partitions_flat_buffer, line 791; pinned on the host with optimizer offload),
        # fp32 master + moments; the fp32 gradient exists one sub-group at a time (line 2686) unless
        # offloaded (then a host buffer per sub-group, line 1338). The module being computed is
        # gathered whole (its params and grads), small tensors stay whole on every rank.
        persistent = low * persistent_params(m, z["stage3_param_persistence_threshold"])
        gathered = low * L
        if offload_params:
            gpu["params"] = gathered + persistent
            host["params"] = low * part
        else:
            gpu["params"] = low * part + gathered + persistent
        fp32_grad_on_gpu = 4 * min(part, z["sub_group_size"])
        if offload_optimizer:
            gpu["grads"] = low * L
            host["grads"] = low * part + 4 * part
            host["optimizer"] = (4 + 8) * part
        else:
            gpu["grads"] = low * L + low * part + fp32_grad_on_gpu
            gpu["optimizer"] = (4 + 8) * part
        # the gradient bucket, the flat copy of it that reduce_scatter_coalesced concatenates
        # (deepspeed/runtime/comm/coalesced_collectives.py) while a bucket is reduced, and the prefetch
        gpu["buffers"] = low * (2 * bucket(z["reduce_bucket_size"]) + bucket(z["stage3_prefetch_bucket_size"]))

    # Building: stages 0-2 construct the whole fp32 model on every rank before DeepSpeed moves it to
    # the GPU; stage 3 with partitioned construction draws one module's fp32 weights at a time.
    if stage == 3 and STAGE3_PARTITIONED_BUILD:
        build_per_rank = 4 * L
    else:
        build_per_rank = 4 * P
    per_gpu = Memory(**gpu)
    per_host = Memory(**{k: v * g for k, v in host.items()}, build=build_per_rank * g)
    return per_gpu, per_host


def plan(
    spec: RunSpec,
    cluster: Cluster,
    zero_config: Mapping[str, Any] | None = None,
    *,
    suggest: bool = True,
    device: str = "cuda",
    teacher: ModelSection | None = None,
) -> Plan:
    """The memory per GPU and per node's host of ``spec`` on ``cluster``; with ``suggest``, and if it
    does not fit, the cheapest changes that do (each re-planned).

    ``zero_config``: the derived DeepSpeed config's ``zero_optimization`` (bucket sizes a base file
    sets); DeepSpeed's defaults otherwise. ``teacher``: the model section of ``distill.teacher``,
    whose online forward is counted per GPU (``teacher_bytes``). Raises ``ValueError`` when the batch
    sizes do not divide the cluster's world size.
    """
    micro, accum, _ = spec.batch_sizes(cluster.world_size)
    gpu, host = model_states(
        spec.model,
        spec.precision,
        spec.zero.stage,
        spec.zero.offload_optimizer,
        spec.zero.offload_params,
        cluster,
        zero_config,
        device,
    )
    acts = activation_bytes(spec.model, micro, spec.data.seq_len, spec.precision, device, spec.data.document_mask)
    taught = 0
    if teacher is not None and spec.distill is not None and spec.distill.source == "online":
        sharded = spec.distill.sharded(spec.zero.stage)
        taught = teacher_bytes(
            teacher, micro, spec.data.seq_len, spec.precision, sharded, cluster.world_size, zero_config
        )
    params = gpu.params
    if spec.zero.stage == 3:
        params += (4 if spec.precision == "fp32" else 2) * held_gathered_params(spec.model)
    gpu = Memory(params, gpu.grads, gpu.optimizer, acts, gpu.buffers, taught)
    result = Plan(
        cluster,
        spec.precision,
        spec.zero.stage,
        spec.zero.offload_optimizer,
        spec.zero.offload_params,
        spec.model.activation_checkpointing,
        micro,
        accum,
        gpu,
        host,
    )
    if suggest and not result.fits:
        result = Plan(**{**result.__dict__, "suggestions": suggestions(spec, cluster, zero_config, teacher)})
    elif suggest:
        result = Plan(**{**result.__dict__, "faster": faster(spec, cluster, zero_config, teacher)})
    return result


# --------------------------------------------------------------------------------------------
# Suggestions.

MAX_NODES = 4096


def _with(spec: RunSpec, overrides: Mapping[str, Any]) -> RunSpec | None:
    """``spec`` with dotted overrides applied and re-validated; None if the result is not a valid spec."""
    data = spec.model_dump(mode="json")
    for key, value in overrides.items():
        section, name = key.split(".")
        data[section][name] = value
    try:
        return RunSpec.model_validate(data)
    except ValueError:
        return None


def _fitting(
    spec: RunSpec, cluster: Cluster, zero_config: Mapping[str, Any] | None, teacher: ModelSection | None
) -> Plan | None:
    try:
        result = plan(spec, cluster, zero_config, suggest=False, teacher=teacher)
    except ValueError:  # batch sizes that do not divide this world size
        return None
    return result if result.fits else None


def _candidates(spec: RunSpec, cluster: Cluster) -> list[tuple[str, dict[str, Any]]]:
    """Single changes, cheapest first: stage (communication), checkpointing (recompute), micro-batch
    (smaller matmuls, same global batch), optimizer offload, param offload (PCIe traffic)."""
    out: list[tuple[str, dict[str, Any]]] = []
    z, m = spec.zero, spec.model
    for stage in range(z.stage + 1, 4):
        out.append((f"ZeRO stage {stage}", {"zero.stage": stage}))
    if m.activation_checkpointing != "every":
        out.append(("activation checkpointing on every block", {"model.activation_checkpointing": "every"}))
    micro, accum, glob = spec.batch_sizes(cluster.world_size)
    for smaller in range(micro - 1, 0, -1):
        if glob % (smaller * cluster.world_size) == 0:
            new_accum = glob // (smaller * cluster.world_size)
            out.append(
                (
                    f"micro-batch {smaller} with {new_accum} accumulation steps (same global batch {glob})",
                    {"train.micro_batch_size": smaller, "train.grad_accum": new_accum, "train.global_batch_size": glob},
                )
            )
    if not z.offload_optimizer:
        out.append(
            ("optimizer state offloaded to the host", {"zero.stage": max(z.stage, 1), "zero.offload_optimizer": True})
        )
    if not z.offload_params:
        out.append(
            (
                "parameters offloaded to the host",
                {"zero.stage": 3, "zero.offload_optimizer": True, "zero.offload_params": True},
            )
        )
    return out


def _min_nodes(
    spec: RunSpec, cluster: Cluster, zero_config: Mapping[str, Any] | None, teacher: ModelSection | None
) -> tuple[Plan, dict[str, Any]] | None:
    """The plan on the fewest nodes (more than now) that fits, and the batch overrides it needs: where
    the global batch does not divide over the ranks, the nearest one that does, same micro-batch."""
    micro, _, glob = spec.batch_sizes(cluster.world_size)
    for nodes in range(cluster.nodes + 1, MAX_NODES + 1):
        bigger = Cluster(nodes, cluster.gpus_per_node, cluster.gpu_memory, cluster.host_memory)
        overrides: dict[str, Any] = {}
        try:
            spec.batch_sizes(bigger.world_size)
            candidate: RunSpec | None = spec
        except ValueError:
            step = micro * bigger.world_size
            new_glob = max(1, round(glob / step)) * step
            overrides = {
                "train.micro_batch_size": micro,
                "train.grad_accum": new_glob // step,
                "train.global_batch_size": new_glob,
            }
            candidate = _with(spec, overrides)
        found = _fitting(candidate, bigger, zero_config, teacher) if candidate else None
        if found:
            return found, overrides
    return None


def suggestions(
    spec: RunSpec,
    cluster: Cluster,
    zero_config: Mapping[str, Any] | None = None,
    teacher: ModelSection | None = None,
) -> list[Suggestion]:
    """Changes that make ``spec`` fit, cheapest first; each was re-planned and fits.

    Every single change that fits on its own, in the order of ``_candidates`` (for the micro-batch,
    the largest that fits); if none does, the changes combined in that order until the run fits.
    Then the minimal node count for the spec as it is, or, if more nodes alone never fit, the
    combinations with their minimal node counts (each needing fewer nodes than the shorter ones).
    """
    out: list[Suggestion] = []
    candidates = _candidates(spec, cluster)
    micro_found = False
    for change, overrides in candidates:
        is_micro = "train.micro_batch_size" in overrides
        changed = None if (is_micro and micro_found) else _with(spec, overrides)
        found = _fitting(changed, cluster, zero_config, teacher) if changed else None
        if found:
            micro_found |= is_micro
            out.append(Suggestion(change, overrides, cluster.nodes, found.per_gpu.total, found.per_node_host.total))
    # the changes combined in order: (what, overrides) after each one; a smaller micro-batch replaces
    # the previous one, an offload never lowers a stage chosen before it
    combos: list[tuple[list[str], dict[str, Any]]] = []
    for change, overrides in candidates:
        names, merged = (list(combos[-1][0]), dict(combos[-1][1])) if combos else ([], {})
        for kind in ("micro-batch", "ZeRO stage"):  # a later one of the same kind replaces the earlier
            if change.startswith(kind):
                names = [n for n in names if not n.startswith(kind)]
        names.append(change)
        stage = merged.get("zero.stage", 0)
        merged.update(overrides)
        if "zero.stage" in merged:
            merged["zero.stage"] = max(merged["zero.stage"], stage)
        combos.append((names, merged))
    if not out:
        for names, combined in combos:
            changed = _with(spec, combined)
            found = _fitting(changed, cluster, zero_config, teacher) if changed else None
            if found:
                out.append(_suggestion(names, combined, found, cluster.nodes))
                break
    bigger = _min_nodes(spec, cluster, zero_config, teacher)
    if bigger:
        out.append(_suggestion([], bigger[1], bigger[0], cluster.nodes))
    elif not out:
        # more nodes alone never fit: each combination that needs fewer nodes than the shorter ones
        fewest = MAX_NODES + 1
        for names, combined in combos:
            changed = _with(spec, combined)
            result = _min_nodes(changed, cluster, zero_config, teacher) if changed else None
            if result and result[0].cluster.nodes < fewest:
                fewest = result[0].cluster.nodes
                out.append(_suggestion(names, {**combined, **result[1]}, result[0], cluster.nodes))
    return out


def _suggestion(names: list[str], overrides: dict[str, Any], found: Plan, nodes_now: int) -> Suggestion:
    """The changes ``names``, on ``found``'s node count when that is more than ``nodes_now`` (with a
    global batch that divides over the ranks when the spec's does not)."""
    what = list(names)
    c = found.cluster
    if c.nodes != nodes_now:
        what.append(f"{c.nodes} nodes")
        if "train.global_batch_size" in overrides and not any(n.startswith("micro-batch") for n in names):
            what.append(f"global batch {overrides['train.global_batch_size']} (to divide over {c.world_size} ranks)")
    return Suggestion(" + ".join(what), dict(overrides), c.nodes, found.per_gpu.total, found.per_node_host.total)


def faster(
    spec: RunSpec,
    cluster: Cluster,
    zero_config: Mapping[str, Any] | None = None,
    teacher: ModelSection | None = None,
) -> list[Suggestion]:
    """For a spec that fits: single changes that save work and still fit (each re-planned), the larger
    saving first. Param and optimizer offload off (PCIe traffic every step), activation checkpointing
    off (the recompute, about a third of a step's FLOPs), the lowest ZeRO stage that fits (stage 3
    all-gathers the weights in the forward and again in the backward), and the largest micro-batch
    that fits with the same global batch (fewer, larger matmuls)."""
    z, m = spec.zero, spec.model
    micro, _, glob = spec.batch_sizes(cluster.world_size)
    groups: list[list[tuple[str, dict[str, Any]]]] = []
    if z.offload_params:
        groups.append([("no parameter offload", {"zero.offload_params": False})])
    if z.offload_optimizer:
        groups.append([("no optimizer offload", {"zero.offload_optimizer": False, "zero.offload_params": False})])
    if m.activation_checkpointing != "none":
        groups.append([("no activation checkpointing", {"model.activation_checkpointing": "none"})])
    groups.append(
        [
            (
                f"ZeRO stage {stage}",
                {"zero.stage": stage} | ({"zero.offload_params": False} if z.offload_params else {}),
            )
            for stage in range(z.stage)
            if not (stage == 0 and z.offload_optimizer)
        ]
    )
    larger = []
    for bigger in range(glob // cluster.world_size, micro, -1):
        if glob % (bigger * cluster.world_size) == 0:
            accum = glob // (bigger * cluster.world_size)
            overrides = {"train.micro_batch_size": bigger, "train.grad_accum": accum, "train.global_batch_size": glob}
            larger.append(
                (f"micro-batch {bigger} with {accum} accumulation steps (same global batch {glob})", overrides)
            )
    groups.append(larger)
    out: list[Suggestion] = []
    for group in groups:  # within a group, the first that fits (the lowest stage, the largest micro-batch)
        for change, overrides in group:
            changed = _with(spec, overrides)
            found = _fitting(changed, cluster, zero_config, teacher) if changed else None
            if found:
                out.append(Suggestion(change, overrides, cluster.nodes, found.per_gpu.total, found.per_node_host.total))
                break
    return out

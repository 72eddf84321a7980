"""The run spec: every setting of a bigtx run, validated before anything starts.

Each section is a pydantic model with ``extra="forbid"``; every field carries a one-line
description that shows up in ``bigtx config schema`` and in error messages. Rules that tie
several fields together live in the section's ``model_validator``; their messages start with
the dotted field they are about, so the CLI prints ``model.n_heads: ...``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from bigtx.config.model_presets import MODEL_PRESETS


class Section(BaseModel):
    """Base of every spec section: unknown keys are errors, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(Section):
    name: str = Field("bigtx", description="Human-readable name of the run, shown in logs and TensorBoard.")
    dir: str = Field("runs/bigtx", description="Run directory: spec, logs, TensorBoard, checkpoints all live here.")
    seed: int = Field(1234, description="Seed for weight init, data order and dropout; identical on every rank.")


class ModelSection(Section):
    preset: str | None = Field(
        None, description="Named architecture (see `bigtx config presets`); explicit fields override it."
    )
    vocab_size: int = Field(
        512, gt=0, description="Embedding rows; >= the tokenizer's vocabulary (pad up to a multiple of 64)."
    )
    d_model: int = Field(64, gt=0, description="Width of the residual stream.")
    n_layers: int = Field(2, gt=0, description="Number of Transformer blocks.")
    n_heads: int = Field(4, gt=0, description="Attention (query) heads; must divide d_model.")
    n_kv_heads: int | None = Field(
        None, gt=0, description="Key/value heads (GQA/MQA); must divide n_heads. Default: n_heads (MHA)."
    )
    d_ff: int = Field(172, gt=0, description="Hidden width of the MLP.")
    max_seq_len: int = Field(256, gt=0, description="Longest sequence the positions support.")
    position: Literal["rope", "learned", "sinusoidal"] = Field("rope", description="Position encoding.")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency (position=rope only).")
    norm: Literal["rmsnorm", "layernorm"] = Field("rmsnorm", description="Normalisation layer.")
    norm_placement: Literal["pre", "post"] = Field(
        "pre", description="Norm before each sub-layer (pre) or after the residual add (post, original Transformer)."
    )
    norm_eps: float = Field(1e-5, gt=0, description="Epsilon of the norm layers.")
    mlp: Literal["swiglu", "gelu"] = Field("swiglu", description="MLP type.")
    qk_norm: bool = Field(False, description="Normalise queries and keys per head before attention.")
    bias: bool = Field(False, description="Bias terms in linear layers and norms.")
    tie_embeddings: bool = Field(False, description="Share the output head's weight with the token embedding.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on attention output, MLP output and embeddings.")
    init_std: float = Field(
        0.02, gt=0, description="Std of the normal init; residual projections get /sqrt(2*n_layers)."
    )
    activation_checkpointing: Literal["none", "every"] | Annotated[int, Field(ge=1)] = Field(
        "none", description="Recompute activations in backward: none, every block, or an int k for every k-th block."
    )
    compile: bool = Field(False, description="torch.compile each block (useful on GPUs; off on CPU).")
    init_from: str | None = Field(
        None, description="Start from these weights: a `bigtx export safetensors`/`bigtx import hf` directory."
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: object) -> object:
        """Fill fields from the named preset; fields given explicitly win."""
        if isinstance(data, dict) and data.get("preset") is not None:
            name = data["preset"]
            if name not in MODEL_PRESETS:
                known = ", ".join(sorted(MODEL_PRESETS))
                raise ValueError(f"preset: unknown model preset {name!r}; choose one of: {known}")
            return {**MODEL_PRESETS[name], **data}
        return data

    @model_validator(mode="after")
    def _check_shape(self) -> ModelSection:
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model: {self.d_model} is not divisible by n_heads={self.n_heads}; pick d_model = n_heads x head_dim"
            )
        if self.n_heads % self.kv_heads:
            raise ValueError(
                f"n_kv_heads: n_heads={self.n_heads} is not divisible by n_kv_heads={self.kv_heads}; "
                "use a divisor of n_heads (1 = MQA, n_heads = MHA)"
            )
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"d_model: RoPE needs an even head_dim, got {self.head_dim}")
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def num_params(self) -> int:
        """Exact parameter count of the model this section describes (matches ``Transformer``)."""
        d, v = self.d_model, self.vocab_size
        norm_params = d * (2 if (self.norm == "layernorm" and self.bias) else 1)
        kv_dim = self.kv_heads * self.head_dim
        attn = d * d * 2 + d * kv_dim * 2
        if self.bias:
            attn += d * 2 + kv_dim * 2
        if self.qk_norm:
            attn += 2 * self.head_dim * (2 if (self.norm == "layernorm" and self.bias) else 1)
        if self.mlp == "swiglu":
            mlp = 3 * d * self.d_ff + (2 * self.d_ff + d if self.bias else 0)
        else:
            mlp = 2 * d * self.d_ff + (self.d_ff + d if self.bias else 0)
        block = attn + mlp + 2 * norm_params
        total = v * d + self.n_layers * block + norm_params
        if not self.tie_embeddings:
            total += v * d
        if self.position == "learned":
            total += self.max_seq_len * d
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N (non-embedding) + attention 12*L*d*T, as in PaLM appendix B."""
        non_embedding = self.num_params() - self.vocab_size * self.d_model
        if self.position == "learned":
            non_embedding -= self.max_seq_len * self.d_model
        if self.tie_embeddings:
            # the tied head is still a matmul per token
            non_embedding += self.vocab_size * self.d_model
        return 6.0 * non_embedding + 12.0 * self.n_layers * self.d_model * seq_len


class DataSource(Section):
    path: str = Field(description="A `bigtx data build` directory, a shard pattern (`{000..009}`), or a URL/pipe:.")
    weight: float = Field(1.0, gt=0, description="Relative share of tokens drawn from this source.")


# A val source's name becomes a metric key (val_loss/<name>), a TensorBoard tag and a plot label.
VAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class ValSource(DataSource):
    name: str | None = Field(
        None, description="Evaluate this source on its own and log it as val_loss/<name> (all entries or none)."
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str | None) -> str | None:
        if name is not None and not VAL_NAME.fullmatch(name):
            # the name goes last: the CLI reads a leading "word: " as the field a message is about
            raise ValueError(
                "cannot be a metric key (val_loss/<name>): use 1-64 letters, digits, '_', '-' or '.', "
                f"starting with a letter or digit; got {name!r}"
            )
        return name


class DataSection(Section):
    train: str | list[DataSource] | None = Field(
        None, description="Training data: a built directory, shard pattern/URL, or a weighted list of sources."
    )
    val: str | list[ValSource] | None = Field(
        None,
        description="Validation data (a built directory means its val split; default: the train directory's): "
        "a path, a weighted list mixed into one val_loss, or a list of named sources, one val_loss/<name> each.",
    )
    tokenizer: str = Field("byte", description="`byte` (built-in) or a tokenizer.json from `bigtx tokenizer train`.")
    seq_len: int = Field(128, gt=0, description="Tokens per training sequence; <= model.max_seq_len.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes per rank.")
    shuffle_buffer: int = Field(256, ge=1, description="Documents held in the sample-shuffle buffer.")
    on_error: Literal["skip", "raise"] = Field(
        "skip", description="Corrupt or mismatching shard: skip it with a warning (counted) or stop the run."
    )
    allow_reshuffle: bool = Field(
        False,
        description="On resume with another world size or worker count, restart the epoch's order (else refuse).",
    )
    document_mask: bool = Field(
        False,
        description="Packed rows: tokens attend only within their document (EOS ends one), positions restart per "
        "document.",
    )

    @model_validator(mode="after")
    def _check_val_names(self) -> DataSection:
        if not isinstance(self.val, list):
            return self
        named = [s.name is not None for s in self.val]
        if any(named) and not all(named):
            i = named.index(False)
            raise ValueError(
                f"data.val[{i}].name: missing; name every entry of data.val (each is evaluated on its own) "
                "or none (the entries are mixed into one val_loss)"
            )
        seen: set[str] = set()
        for i, s in enumerate(self.val):
            if s.name is not None and "weight" in s.model_fields_set:
                raise ValueError(
                    f"data.val[{i}].weight: a named val source is evaluated on its own, so a weight means nothing; "
                    "drop it (weights mix the entries of a list without names)"
                )
            if s.name in seen:
                raise ValueError(
                    f"data.val[{i}].name: {s.name!r} is used twice; names must be unique (each is a metric key)"
                )
            if s.name is not None:
                seen.add(s.name)
        return self

    @property
    def val_names(self) -> list[str]:
        """The names of data.val's named sources, in order; empty when data.val is not such a list."""
        return [s.name for s in self.val if s.name is not None] if isinstance(self.val, list) else []


class TrainSection(Section):
    micro_batch_size: int | None = Field(None, gt=0, description="Sequences per rank per forward pass.")
    grad_accum: int | None = Field(None, gt=0, description="Micro-batches accumulated per optimizer step.")
    global_batch_size: int | None = Field(
        None, gt=0, description="Sequences per optimizer step = micro_batch_size x grad_accum x world size."
    )
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    max_tokens: int | None = Field(None, gt=0, description="Stop once this many tokens were trained on.")
    log_every: int = Field(10, gt=0, description="Write metrics every N steps.")
    eval_every: int = Field(0, ge=0, description="Evaluate on the validation data every N steps (0: only at the end).")
    eval_batches: int = Field(8, gt=0, description="Micro-batches per rank in each evaluation.")
    progress_bar: bool = Field(True, description="Show a tqdm progress bar on rank 0.")

    @model_validator(mode="after")
    def _check_budget(self) -> TrainSection:
        if (self.max_steps is None) == (self.max_tokens is None):
            raise ValueError("max_steps: give exactly one of train.max_steps and train.max_tokens")
        return self


class OptimSection(Section):
    lr: float = Field(3e-4, gt=0, description="Peak learning rate.")
    min_lr: float = Field(3e-5, ge=0, description="Learning rate at the end of the decay.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (applied to matrices only).")
    decay_embeddings: bool = Field(False, description="Also apply weight decay to the embedding matrix.")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this (0: off).")
    z_loss: float = Field(
        0.0,
        ge=0,
        allow_inf_nan=False,
        description="PaLM's z-loss: add this times the mean log(Z)^2 of the softmax normaliser to the loss "
        "(with distill: of the student's logits; 0: off; PaLM used 1e-4).",
    )

    @model_validator(mode="after")
    def _check_lr(self) -> OptimSection:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr: {self.min_lr} is above optim.lr={self.lr}; lower it")
        return self


class ScheduleSection(Section):
    warmup_steps: int = Field(100, ge=0, description="Linear warm-up from 0 to optim.lr over these steps.")
    decay: Literal["cosine", "linear", "constant", "wsd"] = Field("cosine", description="Shape after warm-up.")
    decay_fraction: float = Field(
        0.2, gt=0, le=1, description="wsd only: final fraction of the run spent decaying to min_lr."
    )


class ZeroSection(Section):
    stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage: 0 none, 1 optimizer, 2 +grads, 3 +params.")
    offload_optimizer: bool = Field(False, description="Keep optimizer state (and step) on the CPU; stage >= 1.")
    offload_params: bool = Field(False, description="Keep parameters on the CPU between uses; stage 3 only.")
    hpz_partition_size: int = Field(
        1,
        ge=1,
        description="ZeRO++ hpZ: ranks per secondary weight copy (1: off); the ranks of one node, stage 3 only.",
    )
    quantized_weights: bool = Field(
        False, description="ZeRO++ qwZ: all-gather weights as int8 (CUDA only); stage 3 only."
    )
    quantized_gradients: bool = Field(
        False, description="ZeRO++ qgZ: reduce-scatter gradients as int4 (CUDA only); stage 3 only."
    )

    @model_validator(mode="after")
    def _check_stage(self) -> ZeroSection:
        if self.offload_params and self.stage != 3:
            raise ValueError(f"offload_params: needs zero.stage=3 (got {self.stage}); set zero.stage=3")
        if self.offload_optimizer and self.stage < 1:
            raise ValueError("offload_optimizer: needs zero.stage >= 1 (got 0); set zero.stage=1, 2 or 3")
        # ZeRO++ works on the partitioned parameters, which only stage 3 has
        zeropp = [
            name
            for name, on in (
                ("hpz_partition_size", self.hpz_partition_size > 1),
                ("quantized_weights", self.quantized_weights),
                ("quantized_gradients", self.quantized_gradients),
            )
            if on
        ]
        if zeropp and self.stage != 3:
            raise ValueError(
                f"{zeropp[0]}: ZeRO++ needs zero.stage=3 (got {self.stage}); set zero.stage=3 or turn it off"
            )
        return self


class CheckpointSection(Section):
    # `async` is a Python keyword: the field is `async_` in code and `async` in specs and spec.yaml
    model_config = ConfigDict(extra="forbid", validate_assignment=True, serialize_by_alias=True)

    every_steps: int = Field(0, ge=0, description="Save every N steps (0: off).")
    every_minutes: float = Field(
        0.0, ge=0, description="Save when this many minutes passed since the last save (0: off)."
    )
    keep_last: int = Field(3, ge=1, description="Complete checkpoints kept, newest first.")
    keep_every: int = Field(
        0, ge=0, description="Also keep every checkpoint whose step is a multiple of this (0: off)."
    )
    resume: str = Field(
        "auto", description="`auto`: newest complete checkpoint in run.dir; `none`: start fresh; or a checkpoint path."
    )
    overwrite: bool = Field(False, description="With resume=none, allow starting over an existing run directory.")
    save_at_end: bool = Field(True, description="Save a checkpoint when the run finishes.")
    async_: bool = Field(
        False,
        alias="async",
        description="Write, hash and commit in the background; training stalls only for a copy to host memory.",
    )


class WatchdogSection(Section):
    factor: float = Field(
        10.0,
        gt=1,
        allow_inf_nan=False,
        description="A phase (data, forward, ...) is stuck when it runs past this many median step times.",
    )
    floor_s: float = Field(
        300.0,
        gt=0,
        allow_inf_nan=False,
        description="...and at least this many seconds; at most half of BIGTX_DIST_TIMEOUT_S (collective timeout).",
    )


class DeepSpeedSection(Section):
    base: str | None = Field(
        None, description="A base DeepSpeed JSON: a name in ds_configs/ (e.g. zero2) or a path; the spec fills it."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "warning", description="Log level of DeepSpeed's own logger."
    )


class DistillSection(Section):
    teacher: str = Field(
        description="Teacher: a Hugging Face model, `bigtx export safetensors` output, or bigtx run/checkpoint (a dir)."
    )
    alpha: float = Field(0.5, ge=0, le=1, description="Loss = (1 - alpha) x cross-entropy + alpha x KD.")
    temperature: float = Field(
        1.0, gt=0, description="Both distributions are softmax(logits / temperature); KD is scaled by its square."
    )
    kind: Literal["forward_kl", "reverse_kl"] = Field(
        "forward_kl", description="KD term: KL(teacher ‖ student) (forward_kl) or KL(student ‖ teacher) (reverse_kl)."
    )
    top_k: int = Field(
        0, ge=0, description="KD over the teacher's top-k tokens, both renormalised over them (0: full vocabulary)."
    )
    source: str = Field(
        "online",
        description="`online`: run the teacher each step; or a `bigtx distill cache` directory (read per row).",
    )
    placement: Literal["auto", "replicated", "sharded"] = Field(
        "auto",
        description="The online teacher whole on every rank (replicated), or partitioned over the ranks as a "
        "ZeRO-3 engine with no optimizer (sharded); auto: sharded when zero.stage is 3.",
    )

    def sharded(self, zero_stage: int) -> bool:
        """Whether the online teacher is partitioned over the ranks (``placement``, for a run at ``zero_stage``)."""
        return self.placement == "sharded" or (self.placement == "auto" and zero_stage == 3)

    @model_validator(mode="after")
    def _check_paths(self, info: ValidationInfo) -> DistillSection:
        # Checked here so that a typo fails at `bigtx config validate`, before any process starts. A spec
        # read back from a checkpoint or export (context "saved") describes weights that no longer need
        # the teacher, which may have moved since.
        if (info.context or {}).get("saved"):
            return self
        if not Path(self.teacher).is_dir():
            raise ValueError(
                f"teacher: no directory {self.teacher!r}{_relative_note(self.teacher)}; give a Hugging Face model "
                "directory, a `bigtx export safetensors` directory, or a bigtx run or checkpoint directory"
            )
        if self.source != "online" and not Path(self.source).is_dir():
            raise ValueError(
                f"source: no directory {self.source!r}{_relative_note(self.source)}; "
                "give `online` or a directory written by `bigtx distill cache`"
            )
        return self


class StabilitySection(Section):
    window: int = Field(
        100, ge=1, description="Steps of running loss and gradient-norm statistics a step is held against."
    )
    warmup: int = Field(
        20, ge=2, description="Steps in the window before spikes are looked for (<= window); none is skipped before."
    )
    loss_k: float = Field(
        6.0, gt=0, allow_inf_nan=False, description="A loss above mean + loss_k x std of the window is a spike."
    )
    grad_norm_k: float = Field(
        6.0,
        gt=0,
        allow_inf_nan=False,
        description="A gradient norm (before clipping) above mean + grad_norm_k x std of the window is a spike.",
    )
    rewind_spikes: int = Field(
        3,
        ge=1,
        description="This many spikes within rewind_within steps rewind to the last checkpoint before the first.",
    )
    rewind_within: int = Field(100, ge=1, description="Steps over which rewind_spikes are counted.")
    skip_batches: int = Field(200, ge=0, description="Global batches of data skipped after a rewind (PaLM's recipe).")
    max_rewinds: int = Field(3, ge=0, description="Rewinds allowed in a run; needing one more stops it with an error.")

    @model_validator(mode="after")
    def _check_warmup(self) -> StabilitySection:
        if self.warmup > self.window:
            raise ValueError(
                f"warmup: {self.warmup} exceeds stability.window={self.window}; the window never holds that many "
                "steps: lower stability.warmup or raise stability.window"
            )
        return self


def _relative_note(path: str) -> str:
    return "" if Path(path).is_absolute() else f" (relative to the working directory {Path.cwd()})"


Precision = Literal["bf16", "fp16", "fp32"]


class RunSpec(Section):
    run: RunSection = Field(default_factory=RunSection, description="Name, directory and seed of the run.")
    model: ModelSection = Field(default_factory=ModelSection, description="The Transformer's architecture.")
    data: DataSection = Field(default_factory=DataSection, description="Training/validation data and tokenizer.")
    train: TrainSection = Field(description="Batch sizes, run length, logging and evaluation cadence.")
    optim: OptimSection = Field(default_factory=OptimSection, description="AdamW and gradient clipping.")
    schedule: ScheduleSection = Field(default_factory=ScheduleSection, description="Learning-rate schedule.")
    precision: Precision = Field("bf16", description="Training precision: bf16, fp16 (dynamic loss scaling) or fp32.")
    zero: ZeroSection = Field(default_factory=ZeroSection, description="DeepSpeed ZeRO sharding and offload.")
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection, description="Saving and resuming.")
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection, description="DeepSpeed base config.")
    watchdog: WatchdogSection = Field(
        default_factory=WatchdogSection, description="Hang watchdog: when a rank dumps its stacks under RUN_DIR/hang."
    )
    distill: DistillSection | None = Field(
        None, description="Knowledge distillation from a teacher model (optional; absent: plain pretraining)."
    )
    stability: StabilitySection | None = Field(
        None,
        description="Loss and gradient-norm spikes: skip the step, rewind to a checkpoint (optional; absent: off).",
    )

    @model_validator(mode="after")
    def _check_cross_section(self) -> RunSpec:
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"data.seq_len: {self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}; "
                "lower data.seq_len or raise model.max_seq_len"
            )
        if self.train.max_steps is not None and self.schedule.warmup_steps >= self.train.max_steps:
            raise ValueError(
                f"schedule.warmup_steps: {self.schedule.warmup_steps} is not shorter than "
                f"train.max_steps={self.train.max_steps}; shorten the warm-up"
            )
        if self.stability is not None and self.precision == "fp16":
            raise ValueError(
                "stability: not with precision=fp16: its loss scaler counts a skipped step as a good one and skips "
                "overflowing steps itself; use precision bf16 or fp32, or drop the stability section"
            )
        if self.stability is not None and self.zero.offload_optimizer:
            raise ValueError(
                "stability: not with zero.offload_optimizer=true: skipping a step exactly is not checked for "
                "DeepSpeed's CPU optimizer; set zero.offload_optimizer=false or drop the stability section"
            )
        return self

    def batch_sizes(self, world_size: int) -> tuple[int, int, int]:
        """(micro_batch_size, grad_accum, global_batch_size) for this world size.

        Any two of the three given derive the third; all three must agree. Raises ``ValueError``
        whose message names the fields.
        """
        t = self.train
        micro, accum, glob = t.micro_batch_size, t.grad_accum, t.global_batch_size
        if micro is None and accum is None and glob is None:
            micro, accum = 1, 1
        if glob is None:
            micro, accum = micro or 1, accum or 1
            glob = micro * accum * world_size
        elif micro is None or accum is None:
            known = micro if micro is not None else accum if accum is not None else 1
            denom = known * world_size
            if glob % denom:
                raise ValueError(
                    f"train.global_batch_size: {glob} is not divisible by "
                    f"{'micro_batch_size' if micro is not None else 'grad_accum'}={known} x world size {world_size}"
                )
            if micro is None and accum is None:
                micro, accum = glob // world_size, 1
            elif micro is None:
                micro = glob // denom
            else:
                accum = glob // denom
        if micro * accum * world_size != glob:
            raise ValueError(
                f"train.global_batch_size: {glob} != micro_batch_size {micro} x grad_accum {accum} "
                f"x world size {world_size}; drop one of the three to derive it"
            )
        return micro, accum, glob

    def tokens_per_step(self, world_size: int) -> int:
        return self.batch_sizes(world_size)[2] * self.data.seq_len

    def total_steps(self, world_size: int) -> int:
        """Optimizer steps the run will take (max_steps, or max_tokens rounded up to whole steps)."""
        if self.train.max_steps is not None:
            return self.train.max_steps
        assert self.train.max_tokens is not None
        return math.ceil(self.train.max_tokens / self.tokens_per_step(world_size))

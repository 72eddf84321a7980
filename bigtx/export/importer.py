"""`bigtx import hf`: a Hugging Face Llama (or GPT-2) directory as bigtx weights + spec.yaml.

``hf_source`` reads the directory's config into a bigtx model section (refusing settings bigtx
cannot express exactly, such as RoPE scaling) and serves its tensors under bigtx names, one at a
time, through the same weight maps the export uses in reverse. ``import_hf`` writes them with
`bigtx export safetensors`'s writer, so continued pretraining starts from the result with
``model.init_from: OUT``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError
from safetensors import safe_open
from torch import Tensor

from bigtx.config import SpecError, validate_spec
from bigtx.config.spec import ModelSection
from bigtx.export.safetensors_export import export_safetensors
from bigtx.export.types import ExportError, WeightSource, expected_shapes
from bigtx.export.weight_map import GPT2, LLAMA, Conversion, WeightMap, plan, split
from bigtx.model.weights import tensor_files

# Tensors some Hugging Face checkpoints carry that are not weights (old buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


def _llama_section(c: Any) -> dict[str, Any]:
    problems = []
    if c.hidden_act != "silu":
        problems.append(f"hidden_act={c.hidden_act!r} (bigtx's SwiGLU uses silu)")
    rope = getattr(c, "rope_parameters", None) or {
        **(getattr(c, "rope_scaling", None) or {}),
        "rope_theta": getattr(c, "rope_theta", 10000.0),
    }
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        problems.append(f"RoPE scaling {rope_type!r} (bigtx implements plain RoPE)")
    mlp_bias = getattr(c, "mlp_bias", False)
    if c.attention_bias != mlp_bias:
        problems.append(f"attention_bias={c.attention_bias} but mlp_bias={mlp_bias} (bigtx has one model.bias)")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if head_dim * c.num_attention_heads != c.hidden_size:
        problems.append(f"head_dim={head_dim} x {c.num_attention_heads} heads != hidden_size={c.hidden_size}")
    if problems:
        raise ExportError("cannot import this Llama model into bigtx: " + "; ".join(problems))
    return {
        "vocab_size": c.vocab_size,
        "d_model": c.hidden_size,
        "n_layers": c.num_hidden_layers,
        "n_heads": c.num_attention_heads,
        "n_kv_heads": c.num_key_value_heads or c.num_attention_heads,
        "d_ff": c.intermediate_size,
        "max_seq_len": c.max_position_embeddings,
        "position": "rope",
        "rope_theta": float(rope["rope_theta"]),
        "norm": "rmsnorm",
        "norm_placement": "pre",
        "norm_eps": c.rms_norm_eps,
        "mlp": "swiglu",
        "bias": bool(c.attention_bias),
        "tie_embeddings": bool(c.tie_word_embeddings),
        "dropout": float(getattr(c, "attention_dropout", 0.0)),
        "init_std": c.initializer_range,
    }


def _gpt2_section(c: Any) -> dict[str, Any]:
    problems = []
    if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        problems.append(f"activation_function={c.activation_function!r} (bigtx's GELU MLP is the tanh approximation)")
    if not c.scale_attn_weights or c.scale_attn_by_inverse_layer_idx:
        problems.append("attention scaling other than 1/sqrt(head_dim)")
    if getattr(c, "add_cross_attention", False):
        problems.append("cross-attention")
    if problems:
        raise ExportError("cannot import this GPT-2 model into bigtx: " + "; ".join(problems))
    return {
        "vocab_size": c.vocab_size,
        "d_model": c.n_embd,
        "n_layers": c.n_layer,
        "n_heads": c.n_head,
        "d_ff": c.n_inner or 4 * c.n_embd,
        "max_seq_len": c.n_positions,
        "position": "learned",
        "norm": "layernorm",
        "norm_placement": "pre",
        "norm_eps": c.layer_norm_epsilon,
        "mlp": "gelu",
        "bias": True,
        "tie_embeddings": bool(c.tie_word_embeddings),
        "dropout": float(c.resid_pdrop),
        "init_std": c.initializer_range,
    }


def model_section_from_hf(path: Path) -> tuple[ModelSection, WeightMap]:
    """The bigtx model section equal to the Hugging Face model in ``path`` (Llama or GPT-2)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    readers = {"llama": (_llama_section, LLAMA), "gpt2": (_gpt2_section, GPT2)}
    if config.model_type not in readers:
        raise ExportError(
            f"{path}: model_type {config.model_type!r} cannot be imported; bigtx imports llama and gpt2 models"
        )
    reader, wmap = readers[config.model_type]
    try:
        return ModelSection(**reader(config)), wmap
    except ValidationError as exc:
        raise ExportError(f"{path}: the model does not fit a bigtx model section: {exc}") from None


def _run_spec(path: Path, model: ModelSection) -> Any:
    tokenizer = path / "tokenizer.json"
    data = {
        "run": {"name": path.name, "dir": f"runs/{path.name}"},
        "model": model.model_dump(mode="json"),
        "data": {
            "tokenizer": str(tokenizer.resolve()) if tokenizer.is_file() else "byte",
            "seq_len": min(1024, model.max_seq_len),
        },
        # a placeholder run length, so that the spec is complete; set it before training
        "train": {"max_steps": 1000},
    }
    try:
        return validate_spec(data)
    except SpecError as exc:
        raise ExportError(f"{path}: cannot build a bigtx run spec: {'; '.join(exc.errors)}") from None


def hf_source(path: Path) -> WeightSource:
    """The weights of the Hugging Face model in ``path`` under bigtx names, read one at a time."""
    model, wmap = model_section_from_hf(path)
    spec = _run_spec(path, model)
    try:
        files = tensor_files(path)
    except FileNotFoundError:
        raise ExportError(f"{path}: no model.safetensors (or index); only safetensors weights are imported") from None
    conversions = plan(wmap, expected_shapes(model))
    needed = {conv.hf for conv in conversions}
    missing = sorted(needed - set(files))
    extra = sorted(
        k
        for k in set(files) - needed
        if not k.endswith(_IGNORED_SUFFIXES) and not (model.tie_embeddings and k == "lm_head.weight")
    )
    if missing or extra:
        raise ExportError(
            f"{path}: tensors do not match its config: "
            f"missing {missing[:6] or 'none'}, unexpected {extra[:6] or 'none'}"
        )
    by_key: dict[str, tuple[Conversion, int]] = {k: (conv, i) for conv in conversions for i, k in enumerate(conv.bigtx)}
    # the last two Hugging Face tensors read, split: c_attn's weight and bias serve q, k and v
    last: dict[str, list[Tensor]] = {}

    def read(name: str) -> Tensor:
        conv, part = by_key[name]
        if conv.hf not in last:
            with safe_open(files[conv.hf], framework="pt") as f:
                tensor = f.get_tensor(conv.hf)
            if len(last) >= 2:
                del last[next(iter(last))]
            last[conv.hf] = split(conv, tensor)
        return last[conv.hf][part]

    notes = [] if (path / "tokenizer.json").is_file() else [f"{path} has no tokenizer.json; set data.tokenizer"]
    shapes = expected_shapes(model)
    return WeightSource(
        path=path, spec=spec, kind=f"Hugging Face {wmap.name} model", shapes=shapes, read=read, meta={"notes": notes}
    )


def import_hf(
    path: Path, out: Path, dtype: str = "fp32", max_shard_size: str = "5GB", overwrite: bool = False
) -> WeightSource:
    """Write the Hugging Face model in ``path`` as a bigtx weights directory ``out``; returns the source.

    ``out`` must be new, empty or (with ``overwrite``) an earlier export, and never ``path`` itself.
    """
    source = hf_source(path)
    export_safetensors(source, out, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite)
    return source

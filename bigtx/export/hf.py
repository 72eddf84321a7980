"""`bigtx export hf`: a directory that ``transformers`` loads with no extra code.

Which Hugging Face class a model becomes is decided by its model section alone:

- Llama-style (RoPE, RMSNorm, SwiGLU, pre-norm) -> ``LlamaForCausalLM``, with GQA, tied or untied
  head, and ``model.bias`` as ``attention_bias``/``mlp_bias`` (bigtx's RMSNorm never has a bias).
- classic (learned positions, LayerNorm with bias, tanh-GELU MLP, pre-norm, multi-head)
  -> ``GPT2LMHeadModel``, tied or untied.
- anything else is refused with the option that has no equivalent (post-norm, sinusoidal
  positions, QK-norm, mixed recipes such as RoPE with GELU); `bigtx export safetensors` keeps any
  architecture under bigtx's own names.

``tie_word_embeddings`` is exactly ``model.tie_embeddings``: an untied model's trained head is
written as ``lm_head.weight`` and never replaced by the embedding.

``transformers`` is an optional dependency, imported only inside the functions that need it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bigtx.config.spec import ModelSection
from bigtx.config.special_tokens import EOS_TOKEN, PAD_TOKEN, special_ids
from bigtx.export.consolidate import find_tokenizer_file
from bigtx.export.output import staged_output
from bigtx.export.types import DTYPES, ExportError, TensorJob, WeightSource
from bigtx.export.weight_map import GPT2, LLAMA, WeightMap, combine, plan
from bigtx.export.writer import export_dtype, max_shard_bytes, write_tensors
from bigtx.model import Transformer, generate


def hf_weight_map(cfg: ModelSection) -> WeightMap:
    """The Hugging Face layout ``cfg`` maps to exactly, or ``ExportError`` listing every option that has none."""
    problems = []
    if cfg.norm_placement == "post":
        problems.append(
            "model.norm_placement=post has no Hugging Face equivalent "
            "(LlamaForCausalLM and GPT2LMHeadModel are pre-norm)"
        )
    if cfg.qk_norm:
        problems.append(
            "model.qk_norm=true has no Hugging Face equivalent in LlamaForCausalLM or GPT2LMHeadModel "
            "(neither normalises queries and keys)"
        )
    if cfg.position == "sinusoidal":
        problems.append(
            "model.position=sinusoidal has no Hugging Face equivalent (Llama uses RoPE, GPT-2 learned positions)"
        )
    elif cfg.position == "rope":
        if cfg.norm != "rmsnorm":
            problems.append(
                "model.norm=layernorm with position=rope has no Hugging Face equivalent (LlamaForCausalLM uses RMSNorm)"
            )
        if cfg.mlp != "swiglu":
            problems.append(
                "model.mlp=gelu with position=rope has no Hugging Face equivalent (LlamaForCausalLM uses SwiGLU)"
            )
    else:
        if cfg.norm != "layernorm":
            problems.append(
                "model.norm=rmsnorm with position=learned has no Hugging Face equivalent "
                "(GPT2LMHeadModel uses LayerNorm)"
            )
        if cfg.mlp != "gelu":
            problems.append(
                "model.mlp=swiglu with position=learned has no Hugging Face equivalent "
                "(GPT2LMHeadModel uses a GELU MLP)"
            )
        if not cfg.bias:
            problems.append(
                "model.bias=false with position=learned has no Hugging Face equivalent "
                "(GPT2LMHeadModel has biases in every linear layer and LayerNorm)"
            )
        if cfg.kv_heads != cfg.n_heads:
            problems.append(
                f"model.n_kv_heads={cfg.kv_heads} with position=learned has no Hugging Face equivalent "
                "(GPT2LMHeadModel has no grouped key/value heads)"
            )
    if problems:
        raise ExportError(
            "cannot export to a Hugging Face model:\n  "
            + "\n  ".join(problems)
            + "\n`bigtx export safetensors` exports any architecture under bigtx's own key names"
        )
    return LLAMA if cfg.position == "rope" else GPT2


def hf_config(cfg: ModelSection, wmap: WeightMap, dtype: str, tokens: dict[str, int | None]) -> Any:
    """The ``transformers`` config of ``cfg``: every field set from the spec, none left to defaults."""
    import transformers

    ids = {"bos_token_id": tokens.get("bos"), "eos_token_id": tokens.get("eos"), "pad_token_id": tokens.get("pad")}
    if wmap is LLAMA:
        config = transformers.LlamaConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.d_model,
            intermediate_size=cfg.d_ff,
            num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.kv_heads,
            head_dim=cfg.head_dim,
            hidden_act="silu",
            max_position_embeddings=cfg.max_seq_len,
            initializer_range=cfg.init_std,
            rms_norm_eps=cfg.norm_eps,
            rope_theta=cfg.rope_theta,
            attention_bias=cfg.bias,
            mlp_bias=cfg.bias,
            attention_dropout=cfg.dropout,
            tie_word_embeddings=cfg.tie_embeddings,
            use_cache=True,
            **ids,
        )
        config.architectures = ["LlamaForCausalLM"]
    else:
        config = transformers.GPT2Config(
            vocab_size=cfg.vocab_size,
            n_positions=cfg.max_seq_len,
            n_embd=cfg.d_model,
            n_layer=cfg.n_layers,
            n_head=cfg.n_heads,
            n_inner=cfg.d_ff,
            activation_function="gelu_new",  # GELU with the tanh approximation, as bigtx's GeluMLP
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            layer_norm_epsilon=cfg.norm_eps,
            initializer_range=cfg.init_std,
            scale_attn_weights=True,
            scale_attn_by_inverse_layer_idx=False,
            reorder_and_upcast_attn=False,
            tie_word_embeddings=cfg.tie_embeddings,
            use_cache=True,
            **ids,
        )
        config.architectures = ["GPT2LMHeadModel"]
    config.dtype = str(DTYPES[dtype]).removeprefix("torch.")
    return config


# --------------------------------------------------------------------------------------------
# Tokenizer files.


def _byte_symbols() -> list[str]:
    """The printable character GPT-2's byte-level BPE uses for each byte 0-255 (``bytes_to_unicode``)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    spare = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(spare)) for b in range(256)]


def byte_tokenizer() -> Any:
    """A ``tokenizers.Tokenizer`` equal to bigtx's ``byte`` tokenizer: id = UTF-8 byte, 256 EOS, 257 PAD.

    A byte-level BPE with the 256 byte symbols in byte order and no merges, so every byte is one
    token. One difference: it matches the literal text ``<|endoftext|>`` as the special token,
    where bigtx's byte tokenizer encodes those 13 characters as bytes.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {symbol: i for i, symbol in enumerate(_byte_symbols())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    # added after the 256 byte symbols, so they get the byte tokenizer's ids 256 and 257
    tok.add_special_tokens([AddedToken(EOS_TOKEN, special=True), AddedToken(PAD_TOKEN, special=True)])
    return tok


def load_tokenizer(spec_tokenizer: str, near: Path, override: str | None = None) -> tuple[Any, dict[str, int | None]]:
    """The run's tokenizer as a ``tokenizers.Tokenizer`` and its special ids ``{"bos", "eos", "pad"}``.

    ``override`` (``--tokenizer``) replaces ``data.tokenizer``; a relative tokenizer path is looked
    up as ``find_tokenizer_file`` describes. Raises ``ExportError`` when it cannot be found.
    """
    from tokenizers import Tokenizer

    name = override or spec_tokenizer
    if name == "byte":
        tok = byte_tokenizer()
    else:
        path = Path(override) if override else find_tokenizer_file(name, near)
        if path is None or not path.is_file():
            raise ExportError(
                f"data.tokenizer: {name} not found (looked beside {near} and relative to the working "
                "directory); pass --tokenizer PATH"
            )
        tok = Tokenizer.from_file(str(path))
    eos, pad = special_ids(tok.token_to_id)
    return tok, {"bos": None, "eos": eos, "pad": pad}


def write_tokenizer_files(tok: Any, tokens: dict[str, int | None], out: Path, max_len: int) -> None:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json, for ``AutoTokenizer``."""
    from transformers import PreTrainedTokenizerFast

    names = {k: tok.id_to_token(v) for k, v in tokens.items() if v is not None}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=names.get("eos"),
        pad_token=names.get("pad"),
        model_max_length=max_len,
        # the text must come back exactly as encoded; the default clean-up rewrites " ." to "."
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(out))
    # transformers 5 writes its new class name "TokenizersBackend"; the old name loads in 4.x and 5.x
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# Export and verification.


@dataclass
class ExportReport:
    out: Path
    architecture: str  # the transformers class, e.g. LlamaForCausalLM
    dtype: str
    files: list[str]
    bytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)


def weight_jobs(source: WeightSource, wmap: WeightMap) -> list[TensorJob]:
    """One job per Hugging Face tensor; each reads its bigtx tensor(s) only when it runs."""

    def job(conv: Any) -> TensorJob:
        return TensorJob(conv.hf, conv.hf_shape, lambda: combine(conv, [source.read(k) for k in conv.bigtx]))

    return [job(conv) for conv in plan(wmap, source.shapes)]


def export_hf(
    source: WeightSource,
    out: Path,
    dtype: str = "fp32",
    max_shard_size: str = "5GB",
    tokenizer: str | None = None,
    overwrite: bool = False,
) -> ExportReport:
    """Write ``source`` as a Hugging Face model directory; see the module docstring for the mapping.

    ``out`` must be new, empty or (with ``overwrite``) an earlier export (``bigtx.export.output``).
    """
    from transformers import GenerationConfig

    torch_dtype = export_dtype(dtype)
    t0 = time.perf_counter()
    cfg = source.spec.model
    wmap = hf_weight_map(cfg)
    shard_bytes = max_shard_bytes(max_shard_size)
    tok, tokens = load_tokenizer(source.spec.data.tokenizer, source.path, tokenizer)
    notes = []
    n_tokens = tok.get_vocab_size(with_added_tokens=True)
    if n_tokens > cfg.vocab_size:
        raise ExportError(f"data.tokenizer: {n_tokens} tokens, more than model.vocab_size={cfg.vocab_size}")
    if tokens["eos"] is None:
        notes.append("the tokenizer has no end-of-text token; generation_config.json sets no eos_token_id")
    with staged_output(out, overwrite, "hf", source.path) as tmp:
        files = write_tensors(weight_jobs(source, wmap), tmp, torch_dtype, shard_bytes)
        config = hf_config(cfg, wmap, dtype, tokens)
        config.save_pretrained(str(tmp))
        GenerationConfig(
            bos_token_id=tokens["bos"], eos_token_id=tokens["eos"], pad_token_id=tokens["pad"]
        ).save_pretrained(str(tmp))
        write_tokenizer_files(tok, tokens, tmp, cfg.max_seq_len)
        size = sum(f.stat().st_size for f in tmp.iterdir() if f.name.endswith(".safetensors"))
    return ExportReport(out, config.architectures[0], dtype, files, size, time.perf_counter() - t0, notes)


@dataclass
class Verification:
    max_abs_logit_diff: float
    greedy_ours: list[int]
    greedy_hf: list[int]
    tokenizer_ok: bool
    tolerance: float = 1e-4

    @property
    def greedy_match(self) -> bool:
        return self.greedy_ours == self.greedy_hf

    @property
    def ok(self) -> bool:
        return self.max_abs_logit_diff <= self.tolerance and self.greedy_match and self.tokenizer_ok

    def lines(self) -> list[str]:
        n = len(self.greedy_ours)
        return [
            f"max |logit difference| (fp32, bigtx vs transformers): {self.max_abs_logit_diff:.3e} "
            f"(tolerance {self.tolerance:.0e})",
            f"greedy generation of {n} tokens: {'identical' if self.greedy_match else 'DIFFERENT'}",
            f"tokenizer (AutoTokenizer vs the run's): {'identical ids' if self.tokenizer_ok else 'DIFFERENT ids'}",
        ]


_SAMPLE_TEXT = "Hello, world! Ünïcödé, tabs\tand  spaces.\n1234 <tag> ok"


@torch.no_grad()
def verify_hf_export(
    source: WeightSource, out: Path, dtype: str = "fp32", tokenizer: str | None = None
) -> Verification:
    """Run one random batch through bigtx and through ``transformers`` loading ``out``.

    The bigtx model holds the source weights rounded to the export dtype and both run in fp32, so
    the difference measures the mapping, not the rounding. Also compares greedy generation of 32
    tokens (end-of-text off on both sides) and the tokenizer's ids on a sample text.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = source.spec.model
    model = Transformer(cfg.model_copy(update={"compile": False, "dropout": 0.0})).eval()
    targets = model.state_dict()
    for key, tensor in source.tensors():
        targets[key].copy_(tensor.to(DTYPES[dtype]).float())
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (2, min(64, cfg.max_seq_len)), generator=gen)
    diff = (model(ids) - hf(input_ids=ids).logits).abs().max().item()

    prompt = ids[:1, : min(8, cfg.max_seq_len // 2)]
    n_new = min(32, cfg.max_seq_len - prompt.shape[1])
    ours = generate(model, prompt[0], n_new, greedy=True, eos_id=None)
    theirs = hf.generate(
        prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=n_new, eos_token_id=[]
    )[0, prompt.shape[1] :].tolist()

    tok, _ = load_tokenizer(source.spec.data.tokenizer, source.path, tokenizer)
    auto = AutoTokenizer.from_pretrained(str(out))
    tokenizer_ok = (
        auto(_SAMPLE_TEXT, add_special_tokens=False)["input_ids"]
        == tok.encode(_SAMPLE_TEXT, add_special_tokens=False).ids
        and auto.decode(tok.encode(_SAMPLE_TEXT).ids) == _SAMPLE_TEXT
    )
    return Verification(diff, ours, theirs, tokenizer_ok)

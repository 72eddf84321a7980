"""Weight maps bigtx <-> Hugging Face: key tables, transposes, fusing, refusals, and logits parity on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bigtx.config import validate_spec
from bigtx.config.spec import ModelSection
from bigtx.export import ExportError, WeightSource, export_hf, hf_weight_map, verify_hf_export
from bigtx.export.types import TensorJob, expected_shapes
from bigtx.export.weight_map import GPT2, LLAMA, combine, plan, split
from bigtx.export.writer import convert, max_shard_bytes, plan_shards
from bigtx.model import Transformer

LLAMA_CASES = {
    "gqa-untied": {"n_kv_heads": 2, "tie_embeddings": False},
    "mha-tied": {"n_kv_heads": 4, "tie_embeddings": True},
    "mqa-bias": {"n_kv_heads": 1, "bias": True, "rope_theta": 500.0},
}
GPT2_CASES = {"tied": {"tie_embeddings": True}, "untied": {"tie_embeddings": False}}


def llama(**overrides: object) -> ModelSection:
    return ModelSection(preset="tiny", **overrides)


def classic(**overrides: object) -> ModelSection:
    return ModelSection(preset="classic-tiny", **overrides)


def memory_source(model: Transformer, tmp_path: Path) -> WeightSource:
    """A WeightSource over an in-memory model (what a checkpoint reader provides)."""
    spec = validate_spec({"model": model.cfg.model_dump(), "train": {"max_steps": 1000}, "data": {"seq_len": 64}})
    state = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    return WeightSource(path=tmp_path, spec=spec, kind="in-memory model", shapes=shapes, read=state.__getitem__)


def trained_looking(cfg: ModelSection, seed: int = 0) -> Transformer:
    """Random weights with norms and biases away from their init, so no mapping error can hide."""
    model = Transformer(cfg)
    model.init_weights(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


# --------------------------------------------------------------------------------------------
# The tables.


@pytest.mark.parametrize("case", LLAMA_CASES)
def test_llama_table_names_exactly_the_hf_state_dict(case: str) -> None:
    transformers = pytest.importorskip("transformers")
    from bigtx.export.hf import hf_config

    cfg = llama(**LLAMA_CASES[case])
    convs = plan(LLAMA, expected_shapes(cfg))
    hf = transformers.LlamaForCausalLM(hf_config(cfg, LLAMA, "fp32", {}))
    hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    if cfg.tie_embeddings:  # HF lists the tied head in its state dict; it is not a separate tensor
        assert hf.lm_head.weight is hf.model.embed_tokens.weight
        del hf_shapes["lm_head.weight"]
    assert {c.hf: c.hf_shape for c in convs} == hf_shapes
    assert all(len(c.bigtx) == 1 and not c.transpose for c in convs)


@pytest.mark.parametrize("case", GPT2_CASES)
def test_gpt2_table_names_exactly_the_hf_state_dict(case: str) -> None:
    transformers = pytest.importorskip("transformers")
    from bigtx.export.hf import hf_config

    cfg = classic(**GPT2_CASES[case])
    convs = plan(GPT2, expected_shapes(cfg))
    hf = transformers.GPT2LMHeadModel(hf_config(cfg, GPT2, "fp32", {}))
    hf_shapes = {
        k: tuple(v.shape) for k, v in hf.state_dict().items() if not k.endswith((".attn.bias", ".attn.masked_bias"))
    }
    if cfg.tie_embeddings:
        assert hf.lm_head.weight is hf.transformer.wte.weight
        del hf_shapes["lm_head.weight"]
    else:
        assert hf.lm_head.weight is not hf.transformer.wte.weight
    assert {c.hf: c.hf_shape for c in convs} == hf_shapes


def test_gpt2_fuses_qkv_and_transposes_conv1d() -> None:
    cfg = classic(n_layers=1)
    convs = {c.hf: c for c in plan(GPT2, expected_shapes(cfg))}
    c_attn = convs["transformer.h.0.attn.c_attn.weight"]
    assert c_attn.bigtx == tuple(f"blocks.0.attn.{p}_proj.weight" for p in "qkv") and c_attn.transpose
    assert c_attn.hf_shape == (64, 192)  # Conv1D: [in, out]
    q, k, v = (torch.randn(64, 64) for _ in range(3))
    fused = combine(c_attn, [q, k, v])
    assert torch.equal(fused[:, :64], q.t()) and torch.equal(fused[:, 128:], v.t())
    for a, b in zip(split(c_attn, fused), (q, k, v)):
        assert torch.equal(a, b)
    bias = convs["transformer.h.0.attn.c_attn.bias"]
    assert not bias.transpose and bias.hf_shape == (192,)
    assert not convs["transformer.wte.weight"].transpose and convs["transformer.h.0.mlp.c_fc.weight"].transpose


def test_unmapped_or_incomplete_keys_are_errors() -> None:
    shapes = expected_shapes(llama(qk_norm=True))
    with pytest.raises(ValueError, match="q_norm"):
        plan(LLAMA, shapes)
    shapes = expected_shapes(classic())
    del shapes["blocks.1.attn.k_proj.weight"]
    with pytest.raises(ValueError, match="c_attn.weight needs all of"):
        plan(GPT2, shapes)
    conv = plan(LLAMA, {"embed.weight": (4, 2)})[0]
    with pytest.raises(ValueError, match="shape"):
        split(conv, torch.zeros(2, 4))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"norm_placement": "post"}, "model.norm_placement=post has no Hugging Face equivalent"),
        ({"position": "sinusoidal"}, "model.position=sinusoidal has no Hugging Face equivalent"),
        ({"qk_norm": True}, "model.qk_norm=true has no Hugging Face equivalent"),
        ({"mlp": "gelu"}, "model.mlp=gelu with position=rope"),
        ({"norm": "layernorm"}, "model.norm=layernorm with position=rope"),
        ({"position": "learned"}, "model.norm=rmsnorm with position=learned"),
    ],
)
def test_llama_variants_without_hf_equivalent_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(ExportError, match=message):
        hf_weight_map(llama(**overrides))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"bias": False}, "model.bias=false with position=learned"),
        ({"n_kv_heads": 2}, "model.n_kv_heads=2 with position=learned"),
        ({"mlp": "swiglu"}, "model.mlp=swiglu with position=learned"),
        ({"norm_placement": "post"}, "model.norm_placement=post"),
    ],
)
def test_classic_variants_without_hf_equivalent_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(ExportError, match=message):
        hf_weight_map(classic(**overrides))


def test_every_problem_is_listed_at_once() -> None:
    with pytest.raises(ExportError) as info:
        hf_weight_map(llama(norm_placement="post", qk_norm=True, mlp="gelu"))
    assert str(info.value).count("has no Hugging Face equivalent") == 3
    assert hf_weight_map(llama(bias=True)) is LLAMA and hf_weight_map(classic(tie_embeddings=False)) is GPT2


# --------------------------------------------------------------------------------------------
# Shards and sizes.


def test_max_shard_size_and_shard_plan() -> None:
    assert max_shard_bytes("5GB") == 5 * 10**9 and max_shard_bytes("200KB") == 200_000
    assert max_shard_bytes("2GiB") == 2 * 2**30 and max_shard_bytes("1000") == 1000 and max_shard_bytes("1") == 1
    for bad, why in (("5XB", "cannot read '5XB'"), ("", "cannot read ''"), ("-1GB", "cannot read"), ("0", "positive")):
        with pytest.raises(ExportError, match=f"^--max-shard-size.*{why}"):
            max_shard_bytes(bad)
    jobs = [TensorJob(str(i), (n,), lambda: torch.zeros(1)) for i, n in enumerate([10, 10, 30, 5, 5])]
    assert [[j.key for j in s] for s in plan_shards(jobs, 4, 80)] == [["0", "1"], ["2"], ["3", "4"]]
    assert len(plan_shards(jobs, 4, 10**9)) == 1


# --------------------------------------------------------------------------------------------
# Numerics: bigtx and transformers compute the same function (litgpt-style, tiny configs on CPU).


@pytest.mark.parametrize(
    "cfg",
    [llama(**LLAMA_CASES[c]) for c in LLAMA_CASES] + [classic(**GPT2_CASES[c]) for c in GPT2_CASES],
    ids=[f"llama-{c}" for c in LLAMA_CASES] + [f"gpt2-{c}" for c in GPT2_CASES],
)
def test_exported_model_matches_bigtx_logits_and_greedy(cfg: ModelSection, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    source = memory_source(trained_looking(cfg), tmp_path)
    export_hf(source, tmp_path / "hf", max_shard_size="100KB")
    check = verify_hf_export(source, tmp_path / "hf")
    assert check.max_abs_logit_diff <= 1e-4, check.lines()
    assert check.greedy_match and len(check.greedy_ours) == 32, check.lines()
    assert check.tokenizer_ok


def test_byte_tokenizer_equals_bigtx_byte_tokenizer(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from bigtx.data.tokenizer import ByteTokenizer
    from bigtx.export.hf import byte_tokenizer, load_tokenizer, write_tokenizer_files

    tok, ids = load_tokenizer("byte", tmp_path)
    assert ids == {"bos": None, "eos": 256, "pad": 257}
    write_tokenizer_files(byte_tokenizer(), ids, tmp_path, 256)
    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    ours = ByteTokenizer()
    every_byte = bytes(range(256)).decode("latin-1")
    for text in ("Grüße, naïve café — 漢字 🙂\ttabs\n", every_byte, "  leading spaces", ""):
        expected = ours.encode(text)
        assert auto(text, add_special_tokens=False)["input_ids"] == expected == tok.encode(text).ids
        assert auto.decode(expected) == text
    assert (auto.eos_token_id, auto.pad_token_id) == (256, 257)


def test_fp16_export_refuses_values_beyond_its_range() -> None:
    job = TensorJob("w", (2,), lambda: torch.tensor([1.0, 1e6]))
    assert convert(job, torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ExportError, match="beyond fp16's range"):
        convert(job, torch.float16)

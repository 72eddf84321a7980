"""Unit tests of bigtx.model.Transformer on tiny CPU configs."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from bigtx.config.model_presets import MODEL_PRESETS
from bigtx.config.spec import ModelSection
from bigtx.model import Transformer


def tiny(**overrides: object) -> ModelSection:
    return ModelSection(preset="tiny", **overrides)


def build(cfg: ModelSection, seed: int = 0) -> Transformer:
    model = Transformer(cfg)
    model.init_weights(seed)
    return model


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.parametrize("placement", ["pre", "post"])
@pytest.mark.parametrize("position", ["rope", "learned", "sinusoidal"])
def test_changing_later_tokens_leaves_earlier_logits_unchanged(position: str, placement: str) -> None:
    model = build(tiny(position=position, norm_placement=placement)).eval()
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    t = 11
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 7) % 320
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=0)
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])


@pytest.mark.parametrize("policy", ["every", 2])
def test_activation_checkpointing_gives_identical_loss_and_gradients(policy: str | int) -> None:
    cfg = tiny(n_layers=4)
    ids = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(1))
    targets = torch.roll(ids, -1, dims=1)
    results = []
    for ac in ("none", policy):
        model = build(cfg.model_copy(update={"activation_checkpointing": ac})).train()
        loss = model(ids, targets)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert (loss_a - loss_b).abs().item() <= 1e-6
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert (grads_a[name] - grads_b[name]).abs().max().item() <= 1e-6, name


def test_checkpoint_policy_selects_blocks() -> None:
    assert build(tiny(n_layers=5, activation_checkpointing=2))._checkpointed == [True, False, True, False, True]
    assert build(tiny(n_layers=3, activation_checkpointing="every"))._checkpointed == [True] * 3
    assert build(tiny(n_layers=3))._checkpointed == [False] * 3


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_grouped_kv_heads_equal_mha_with_repeated_kv_weights(n_kv_heads: int) -> None:
    """GQA/MQA head h uses kv head h // (n_heads // n_kv_heads), the Hugging Face grouping."""
    gqa = build(tiny(n_kv_heads=n_kv_heads)).eval()
    mha = Transformer(tiny(n_kv_heads=None)).eval()
    group, head_dim = 4 // n_kv_heads, gqa.cfg.head_dim
    state = {}
    for name, value in gqa.state_dict().items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            value = value.view(n_kv_heads, head_dim, -1).repeat_interleave(group, dim=0).reshape(64, -1)
        state[name] = value
    mha.load_state_dict(state)
    ids = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(gqa(ids), mha(ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("preset", sorted(MODEL_PRESETS))
def test_param_count_matches_spec_for_every_preset(preset: str) -> None:
    cfg = ModelSection(preset=preset)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.num_params() == cfg.num_params()
    assert model.flops_per_token(128) == cfg.flops_per_token(128)


@pytest.mark.parametrize(
    "overrides",
    [
        {"norm": "layernorm", "bias": True, "qk_norm": True, "mlp": "gelu"},
        {"norm": "layernorm", "bias": False, "qk_norm": True, "tie_embeddings": True},
        {"bias": True, "position": "learned", "n_kv_heads": 1},
        {"position": "sinusoidal", "qk_norm": True},
    ],
)
def test_param_count_matches_spec_for_variants(overrides: dict[str, object]) -> None:
    cfg = tiny(**overrides)
    assert Transformer(cfg).num_params() == cfg.num_params()


@pytest.mark.parametrize(
    ("preset", "published"),
    [("llama-7b", 6_738_415_616), ("llama-13b", 13_015_864_320), ("llama-70b", 68_976_648_192)],
)
def test_llama_presets_match_llama2_sizes(preset: str, published: int) -> None:
    assert ModelSection(preset=preset).num_params() == published


@pytest.mark.parametrize("preset", ["llama-125m", "llama-1.3b", "llama-7b", "llama-70b"])
def test_big_presets_build_on_meta_without_allocating(preset: str) -> None:
    before = _rss_bytes()
    with torch.device("meta"):
        model = Transformer(ModelSection(preset=preset))
    assert all(p.is_meta for p in model.parameters())
    assert _rss_bytes() - before < 200 * 2**20


def test_state_dict_keys_llama_untied() -> None:
    keys = list(build(tiny(n_layers=1, qk_norm=True)).state_dict())
    assert keys == [
        "embed.weight",
        "blocks.0.attn_norm.weight",
        "blocks.0.attn.q_proj.weight",
        "blocks.0.attn.k_proj.weight",
        "blocks.0.attn.v_proj.weight",
        "blocks.0.attn.o_proj.weight",
        "blocks.0.attn.q_norm.weight",
        "blocks.0.attn.k_norm.weight",
        "blocks.0.mlp_norm.weight",
        "blocks.0.mlp.gate_proj.weight",
        "blocks.0.mlp.up_proj.weight",
        "blocks.0.mlp.down_proj.weight",
        "final_norm.weight",
        "lm_head.weight",
    ]


def test_state_dict_keys_classic_tied() -> None:
    keys = list(build(ModelSection(preset="classic-tiny", n_layers=1)).state_dict())
    block = [
        f"blocks.0.{m}.{p}"
        for m in ("attn_norm", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp_norm")
        + ("mlp.fc_in", "mlp.fc_out")
        for p in ("weight", "bias")
    ]
    assert keys == ["embed.weight", "pos_embed.weight", *block, "final_norm.weight", "final_norm.bias"]


def test_sinusoidal_table_is_not_in_state_dict_and_compile_keeps_keys() -> None:
    model = build(tiny(position="sinusoidal"))
    assert "pos_table" not in model.state_dict()
    compiled = Transformer(tiny(position="sinusoidal", compile=True))
    assert list(compiled.state_dict()) == list(model.state_dict())


def test_init_weights_distribution() -> None:
    cfg = tiny(n_layers=2, d_model=256, d_ff=512, n_heads=4, bias=True, norm="layernorm")
    model = build(cfg)
    residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            assert torch.all(p == 0), name
        elif "norm" in name:
            assert torch.all(p == 1), name
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            assert p.std().item() == pytest.approx(residual_std, rel=0.05), name
        else:
            assert p.std().item() == pytest.approx(cfg.init_std, rel=0.05), name


def test_init_weights_ignores_global_rng_and_seed_matters() -> None:
    torch.manual_seed(1)
    a = build(tiny(), seed=5)
    torch.manual_seed(2)
    b = build(tiny(), seed=5)
    c = build(tiny(), seed=6)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
        if name.endswith("proj.weight"):
            assert not torch.equal(pa, pc), name


_HASH_STATE = """
import hashlib, sys, torch
from bigtx.config.spec import ModelSection
from bigtx.model import Transformer
torch.manual_seed(int(sys.argv[1]))  # a different global RNG in each process must not matter
model = Transformer(ModelSection(preset="tiny", qk_norm=True))
model.init_weights(1234)
h = hashlib.sha256()
for name, t in model.state_dict().items():
    h.update(name.encode())
    h.update(t.numpy().tobytes())
print(h.hexdigest())
"""


def test_same_seed_gives_bit_identical_weights_in_two_processes() -> None:
    procs = [
        subprocess.Popen([sys.executable, "-c", _HASH_STATE, str(i)], stdout=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    digests = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(digests[0]) == 64 and digests[0] == digests[1]


def test_initial_loss_is_close_to_uniform() -> None:
    model = build(tiny()).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        losses = [
            model(torch.randint(0, 320, (4, 64), generator=gen), torch.randint(0, 320, (4, 64), generator=gen))
            for _ in range(3)
        ]
    assert abs(torch.stack(losses).mean().item() - math.log(320)) < 0.1


def test_loss_is_fp32_under_bf16_autocast_and_ignores_minus_100() -> None:
    model = build(tiny())
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(4))
    targets = ids.clone()
    targets[:, 8:] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, targets)
        logits = model(ids)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    expected = torch.nn.functional.cross_entropy(logits[:, :8].float().flatten(0, 1), ids[:, :8].flatten())
    torch.testing.assert_close(loss, expected)


def test_tiny_model_overfits_one_batch() -> None:
    torch.manual_seed(0)
    model = build(tiny()).train()
    ids = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(5))
    targets = torch.roll(ids, -1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(200):
        loss = model(ids, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if loss.item() < 0.1:
            break
    assert loss.item() < 0.1


def _hf_llama_from(model: Transformer) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = model.cfg
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    names = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm", "attn.": "self_attn."}
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("blocks."):
            key = "model.layers." + key.removeprefix("blocks.")
            for ours, theirs in names.items():
                key = key.replace(ours, theirs)
        else:
            key = {"embed.weight": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight"}.get(key, key)
        state[key] = value
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected
    assert set(missing) <= {"lm_head.weight"}  # tied: HF shares it with the embedding
    return hf


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_logits_match_hugging_face_llama(tied: bool, n_kv_heads: int) -> None:
    model = build(tiny(tie_embeddings=tied, n_kv_heads=n_kv_heads, rope_theta=500.0)).eval()
    hf = _hf_llama_from(model)
    ids = torch.randint(0, 320, (2, 48), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ours, theirs = model(ids), hf(input_ids=ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


# sha256 (first 16 hex digits) of the state dict after init_weights(123), as the per-name seeded init
# produced it before initial_value existed: ZeRO-3 writes initial_value into gathered parameters, so it
# must stay bit-identical to the unpartitioned build. The sinusoidal table is not hashed: it is no draw,
# and torch's vectorised exp/sin round its last bit differently on AVX2 and AVX-512 CPUs.
_INIT_HASHES = {
    (): "0afee273266026bf",
    (("tie_embeddings", True),): "8a3982a3826528a0",
    (("qk_norm", True),): "a377cea2cb2d15cc",
    (("bias", True), ("norm", "layernorm")): "51754349b5e52a48",
    (("mlp", "gelu"), ("position", "sinusoidal"), ("bias", True)): "4158660524cf7755",
    (("position", "learned"), ("norm_placement", "post")): "992f127c5b153329",
}


@pytest.mark.parametrize("flags", list(_INIT_HASHES), ids=lambda f: "-".join(k for k, _ in f) or "default")
def test_initial_values_are_unchanged(flags: tuple) -> None:
    import hashlib

    torch.manual_seed(0)
    model = build(tiny(**dict(flags)), seed=123)
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.contiguous().numpy().tobytes())
    assert h.hexdigest()[:16] == _INIT_HASHES[flags]
    if hasattr(model, "pos_table"):  # sin/cos of pos / 10000^(2i/d) in fp64 (fp32 angles make 1e-5 of error)
        length, dim = model.pos_table.shape
        angle = torch.arange(length, dtype=torch.float64)[:, None] / 10000.0 ** (
            torch.arange(0, dim, 2, dtype=torch.float64) / dim
        )
        assert model.pos_table.dtype == torch.float32
        torch.testing.assert_close(model.pos_table[:, 0::2].double(), angle.sin(), atol=1e-4, rtol=0)
        torch.testing.assert_close(model.pos_table[:, 1::2].double(), angle.cos(), atol=1e-4, rtol=0)
    for name, p in model.named_parameters():
        value = model.initial_value(name, p.shape, seed=123)
        assert value.dtype == torch.float32 and value.device.type == "cpu" and torch.equal(value, p), name


def test_refill_buffers_after_meta_construction() -> None:
    cfg = tiny(position="sinusoidal")
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device="cpu")
    model.refill_buffers()
    assert torch.equal(model.pos_table, Transformer(cfg).pos_table)
    assert model.pos_table.dtype == torch.float32

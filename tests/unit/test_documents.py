"""Document masking (data.document_mask, bigtx.model.documents): documents found from EOS, and a packed
batch that computes what its documents compute one by one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bigtx.config import SpecError, load_spec
from bigtx.config.spec import ModelSection
from bigtx.model import Transformer, layers
from bigtx.model import documents as documents_mod
from bigtx.model.documents import attention_inputs, find_documents, uses_varlen
from bigtx.model.layers import rope_tables

EOS = 0

# Row 0 starts mid-document (no EOS before its first token), holds a one-token document (the EOS at 6
# right after the EOS at 5) and ends mid-document; row 1 ends exactly at an EOS.
ROW0_EOS, ROW1_EOS = (5, 6, 20), (10, 31)

VARIANTS = [
    {},
    {"n_kv_heads": 2, "qk_norm": True},
    {"mlp": "gelu", "norm": "layernorm", "bias": True, "position": "learned", "tie_embeddings": True},
    {"position": "sinusoidal", "norm_placement": "post"},
]


def model_of(**overrides: object) -> Transformer:
    cfg = ModelSection(d_model=64, n_heads=4, d_ff=128, vocab_size=50, n_layers=2, max_seq_len=64, **overrides)
    model = Transformer(cfg)
    model.init_weights(0)
    return model


def packed_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(1, 50, (2, 32), generator=gen)
    y = torch.randint(0, 50, (2, 32), generator=gen)
    x[0, list(ROW0_EOS)] = EOS
    x[1, list(ROW1_EOS)] = EOS
    return x, y


def test_documents_end_with_their_eos_and_positions_restart() -> None:
    x = torch.tensor([[7, 7, EOS, 7, EOS, EOS, 7], [EOS, 7, 7, 7, 7, 7, 7]])
    docs = find_documents(x, EOS)
    # row 0 starts mid-document: that piece is document 0 with positions from 0; its EOS belongs to it
    assert docs.ids.tolist() == [[0, 0, 0, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]]
    assert docs.positions.tolist() == [[0, 1, 2, 0, 1, 0, 0], [0, 0, 1, 2, 3, 4, 5]]
    no_eos = find_documents(torch.full((1, 5), 7), EOS)
    assert no_eos.ids.tolist() == [[0] * 5] and no_eos.positions.tolist() == [[0, 1, 2, 3, 4]]


def test_the_mask_lets_a_token_see_only_its_own_documents_past() -> None:
    docs = find_documents(torch.tensor([[7, EOS, 7, 7]]), EOS)
    bias = attention_inputs(docs, torch.float32, attention_dropout=False).bias
    assert bias is not None and bias.shape == (1, 1, 4, 4)
    allowed = (bias[0, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    assert set(bias.unique().tolist()) == {0.0, float("-inf")}


def _documents_one_by_one(
    model: Transformer, x: torch.Tensor, y: torch.Tensor
) -> tuple[list[tuple[int, torch.Tensor]], torch.Tensor]:
    """Each document of the packed batch alone: (row, token mask, logits) and the token-weighted mean
    loss, which is what the packed loss averages (every target counts once)."""
    docs = find_documents(x, EOS)
    pieces, total = [], torch.zeros((), dtype=torch.float64)
    for b in range(x.shape[0]):
        for d in docs.ids[b].unique().tolist():
            sel = docs.ids[b] == d
            xs, ys = x[b, sel][None], y[b, sel][None]
            pieces.append((b, sel, model(xs)[0]))
            total += model(xs, ys).double() * xs.shape[1]
    return pieces, total / x.numel()


@pytest.mark.parametrize("overrides", VARIANTS)
def test_a_packed_batch_computes_what_its_documents_compute_alone(overrides: dict) -> None:
    model = model_of(**overrides).eval()
    x, y = packed_batch()
    docs = find_documents(x, EOS)
    with torch.no_grad():
        logits = model(x, documents=docs)
        loss = model(x, y, documents=docs)
        pieces, alone = _documents_one_by_one(model, x, y)
        plain = model(x, y)
    assert len(pieces) == 6
    for b, sel, piece in pieces:
        torch.testing.assert_close(logits[b, sel], piece, rtol=0, atol=1e-5)
    assert loss.item() == pytest.approx(alone.item(), rel=1e-6, abs=0)
    assert abs(plain.item() - alone.item()) > 1e-3  # without the mask the rows see across documents


@pytest.mark.parametrize("checkpointing", ["none", "every"])
def test_packed_gradients_equal_the_documents_gradients(checkpointing: str) -> None:
    """Training mode, with and without activation checkpointing (the mask and positions go through the
    checkpointed blocks): the packed loss's gradient is the token-weighted sum of the documents'."""
    x, y = packed_batch()
    packed = model_of(n_kv_heads=2, activation_checkpointing=checkpointing).train()
    packed(x, y, documents=find_documents(x, EOS)).backward()
    alone = model_of(n_kv_heads=2, activation_checkpointing=checkpointing).train()
    _, loss = _documents_one_by_one(alone, x, y)
    loss.backward()
    for (name, p), q in zip(packed.named_parameters(), alone.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_checkpointing_leaves_the_masked_gradients_bit_identical() -> None:
    x, y = packed_batch()
    grads = []
    for checkpointing in ("none", "every"):
        model = model_of(activation_checkpointing=checkpointing).train()
        model(x, y, documents=find_documents(x, EOS)).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_rows_without_eos_are_one_document_each() -> None:
    """No EOS: one document per row, positions 0..T-1 as without the mask; the loss agrees (another kernel
    path, so to fp32 rounding, not bit for bit)."""
    model = model_of().eval()
    x = torch.randint(1, 50, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        masked, plain = model(x, x, documents=find_documents(x, EOS)), model(x, x)
    assert masked.item() == pytest.approx(plain.item(), rel=1e-6, abs=0)


def test_rope_tables_keep_todays_bits() -> None:
    """The refactored tables (positions times frequencies) equal the outer product they replaced."""
    cos, sin = rope_tables(3, 40, 32, 10000.0, torch.device("cpu"))
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 32, 2, dtype=torch.int64).float() / 32))
    freqs = torch.outer(torch.arange(3, 43, dtype=torch.float32), inv_freq)
    assert torch.equal(cos, freqs.cos()) and torch.equal(sin, freqs.sin())


def _varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size, enable_gqa):  # noqa: ANN001, ANN202
    """``varlen_attn``'s contract on the CPU: causal SDPA over each document of the flattened batch."""
    assert window_size == (-1, 0) and torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32 and max_q == max_k
    lengths = (cu_q[1:] - cu_q[:-1]).tolist()
    assert max(lengths) == max_q and sum(lengths) == q.shape[0]
    out = []
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        qs, ks, vs = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))
        out.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=enable_gqa)[0].transpose(0, 1))
    return torch.cat(out)


def test_the_varlen_path_lays_out_documents_as_the_kernel_expects(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA path (unverified on a GPU here) with the kernel replaced by its contract: the offsets,
    the flattening and the head layout give the masked SDPA path's loss."""
    model = model_of(n_kv_heads=2).eval()
    x, y = packed_batch()
    docs = find_documents(x, EOS)
    with torch.no_grad():
        sdpa = model(x, y, documents=docs)
        monkeypatch.setattr(documents_mod, "uses_varlen", lambda *_: True)
        monkeypatch.setattr(layers, "varlen_attn", _varlen_reference)
        varlen = model(x, y, documents=docs)
    inputs = attention_inputs(docs, torch.float32, attention_dropout=False)
    assert inputs.bias is None and inputs.cu_seqlens is not None
    assert inputs.cu_seqlens.tolist() == [0, 6, 7, 21, 32, 43, 64] and inputs.max_len == 21
    assert varlen.item() == pytest.approx(sdpa.item(), rel=1e-6, abs=0)


def test_varlen_only_on_cuda_in_16_bits_without_attention_dropout() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert uses_varlen(cuda, torch.bfloat16, False) and uses_varlen(cuda, torch.float16, False)
    assert not uses_varlen(cuda, torch.float32, False)  # FlashAttention has no fp32 kernel
    assert not uses_varlen(cuda, torch.bfloat16, True)  # nor dropout
    assert not uses_varlen(cpu, torch.bfloat16, False)


def test_documents_and_a_kv_cache_exclude_each_other() -> None:
    model = model_of().eval()
    x, _ = packed_batch()
    with pytest.raises(ValueError, match="documents and cache"):
        model(x, cache=model.new_cache(), documents=find_documents(x, EOS))


def test_the_spec_flag_defaults_off_and_takes_only_a_boolean() -> None:
    assert load_spec("tiny").data.document_mask is False
    assert load_spec("tiny", ["data.document_mask=true"]).data.document_mask is True
    with pytest.raises(SpecError, match="data.document_mask"):
        load_spec("tiny", ["data.document_mask=sometimes"])

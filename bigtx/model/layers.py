"""Building blocks of the Transformer: norms, position encodings, attention, MLPs and the KV cache.

Everything here is plain single-device PyTorch; sharding and precision are applied around it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.varlen import varlen_attn

from bigtx.config.spec import ModelSection
from bigtx.model.documents import DocumentAttention


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain (no bias), as in Llama."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """Normalise over the last dim; returns ``x``'s dtype."""
        # Normalise in fp32 even for bf16 inputs: the mean of squares loses too much in bf16.
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).to(x.dtype)


def make_norm(cfg: ModelSection, dim: int) -> nn.Module:
    """The norm ``cfg.norm`` over ``dim`` features; LayerNorm has a bias only when ``cfg.bias``."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


def rope_tables(
    start_pos: int, seq_len: int, head_dim: int, theta: float, device: torch.device
) -> tuple[Tensor, Tensor]:
    """fp32 (cos, sin) tables of shape [seq_len, head_dim // 2] for positions start_pos..start_pos+seq_len-1.

    The frequencies are Hugging Face Llama's (``1 / theta ** (2i / head_dim)``), computed the same way so
    the rotations match ``LlamaForCausalLM`` to the last bit in fp32.
    """
    pos = torch.arange(start_pos, start_pos + seq_len, device=device, dtype=torch.float32)
    return rope_tables_at(pos, head_dim, theta)


def rope_tables_at(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """fp32 (cos, sin) tables of shape [*positions.shape, head_dim // 2] for any ``positions`` (e.g. [B, T]
    positions that restart at each document, ``bigtx.model.documents``); as ``rope_tables`` otherwise."""
    # Computed per forward, not kept as buffers: module.bfloat16() (what DeepSpeed's bf16 mode does)
    # would round buffers to bf16, and a meta-built model would need them re-filled. The cost is
    # one tiny outer product per forward.
    device = positions.device
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    # one fp32 multiply per entry, as torch.outer does: the same bits as the outer product
    freqs = positions.float()[..., None] * inv_freq
    return freqs.cos(), freqs.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` [B, T, H, head_dim] in the "rotate_half" layout (pairs are i and i + head_dim/2), by
    tables [T, head_dim/2] (the same positions in every row) or [B, T, head_dim/2].

    Equals Hugging Face's ``x * cos + rotate_half(x) * sin`` with the half-size tables. Like Hugging
    Face, the rotation runs in ``x``'s dtype (the fp32 tables are cast to it): under bf16 that avoids
    an fp32 copy of every query and key.
    """
    x1, x2 = x.chunk(2, dim=-1)
    # [(B,) T, hd/2] -> [(B,) T, 1, hd/2] to broadcast over heads
    cos, sin = cos[..., None, :].to(x.dtype), sin[..., None, :].to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def sinusoidal_table(max_seq_len: int, dim: int) -> Tensor:
    """The fixed sin/cos position table of "Attention Is All You Need", [max_seq_len, dim] fp32."""
    pos = torch.arange(max_seq_len, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(max_seq_len, dim)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div)[:, : dim // 2]
    return table


class LayerKV:
    """One layer's keys and values for incremental decoding, [B, n_kv_heads, max_len, head_dim] each.

    The storage is allocated on the first ``update`` with the dtype and device of the keys it gets, so
    the cache follows whatever precision the model runs in.
    """

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def update(self, k: Tensor, v: Tensor, start_pos: int) -> tuple[Tensor, Tensor]:
        """Store ``k``, ``v`` [B, KV, T, hd] at positions start_pos.. and return all keys/values up to them."""
        end = start_pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; writing up to {end}")
        if self.k is None or self.v is None:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.k = k.new_empty(shape)
            self.v = v.new_empty(shape)
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Keys and values of every layer plus the number of positions already decoded.

    Pass it to ``Transformer.forward(..., cache=cache)``: the forward reads ``length`` as the position
    of its first token, appends its keys/values and advances ``length``.
    """

    def __init__(self, n_layers: int, max_len: int) -> None:
        self.layers = [LayerKV(max_len) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0


class Attention(nn.Module):
    """Causal multi-head attention with grouped key/value heads (GQA/MQA), RoPE and optional QK-norm."""

    def __init__(self, cfg: ModelSection) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.dropout = cfg.dropout
        kv_dim = self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.d_model, kv_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.d_model, kv_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        # one norm over head_dim shared by all heads (Qwen3/OLMo-2 per-head style), before RoPE
        self.q_norm = make_norm(cfg, self.head_dim) if cfg.qk_norm else None
        self.k_norm = make_norm(cfg, self.head_dim) if cfg.qk_norm else None

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        kv: LayerKV | None = None,
        start_pos: int = 0,
        docs: DocumentAttention | None = None,
    ) -> Tensor:
        """Attend causally over ``x`` [B, T, d] (and over the cached positions before it when ``kv``);
        with ``docs``, each token only over the earlier tokens of its own document."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if docs is not None and docs.cu_seqlens is not None:
            # the documents laid end to end, [B*T, heads, hd]: no transpose, nothing computed across them.
            # q and k in v's dtype: a LayerNorm QK-norm under autocast returns fp32, which the kernel refuses
            y = varlen_attn(
                q.reshape(B * T, self.n_heads, self.head_dim).to(v.dtype),
                k.reshape(B * T, self.n_kv_heads, self.head_dim).to(v.dtype),
                v.reshape(B * T, self.n_kv_heads, self.head_dim),
                docs.cu_seqlens,
                docs.cu_seqlens,
                docs.max_len,
                docs.max_len,
                window_size=(-1, 0),  # causal
                enable_gqa=self.n_kv_heads != self.n_heads,
            )
            return self.o_proj(y.view(B, T, -1))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

        mask: Tensor | None = None
        is_causal = True
        if docs is not None:
            mask, is_causal = docs.bias, False
        elif kv is not None:
            k, v = kv.update(k, v, start_pos)
            if start_pos > 0:
                # SDPA's is_causal aligns the triangle top-left, wrong once keys precede the queries.
                # One new token may see every cached key; a chunk needs an explicit bottom-right mask.
                is_causal = False
                if T > 1:
                    mask = torch.ones(T, start_pos + T, dtype=torch.bool, device=x.device).tril(start_pos)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    """Llama's gated MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelSection) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GeluMLP(nn.Module):
    """GPT-2's MLP: fc_out(gelu(fc_in(x))).

    Uses the tanh approximation of GELU, which is GPT-2's ``gelu_new``, so a classic model exports to
    ``GPT2LMHeadModel`` without changing its function.
    """

    def __init__(self, cfg: ModelSection) -> None:
        super().__init__()
        self.fc_in = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.fc_out = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_out(F.gelu(self.fc_in(x), approximate="tanh"))

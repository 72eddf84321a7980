"""The decoder-only Transformer described by a ``ModelSection``.

Construction follows PyTorch's usual module defaults (global RNG, like any ``nn.Linear``); the bigtx
initialisation is ``init_weights(seed)``, which the caller runs after construction. On
``torch.device("meta")`` construction allocates nothing, so a big model can be built there, moved
with ``to_empty(device=...)`` and then initialised with ``init_weights``. Under ZeRO-3 the model is
built partitioned (``bigtx.zero3``) and each parameter set to ``initial_value``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from bigtx.config.spec import ModelSection
from bigtx.model.documents import DocumentAttention, Documents, attention_inputs
from bigtx.model.layers import (
    Attention,
    GeluMLP,
    KVCache,
    LayerKV,
    RMSNorm,
    SwiGLU,
    make_norm,
    rope_tables,
    rope_tables_at,
    sinusoidal_table,
)
from bigtx.model.loss import cross_entropy

# Output projections that write into the residual stream; their init std is scaled by 1/sqrt(2*n_layers)
# (GPT-2) so the residual's variance does not grow with depth.
_RESIDUAL_PROJECTIONS = ("attn.o_proj.weight", "mlp.down_proj.weight", "mlp.fc_out.weight")


class Block(nn.Module):
    """One Transformer layer: attention then MLP, each with a residual and a norm (pre or post)."""

    def __init__(self, cfg: ModelSection) -> None:
        super().__init__()
        self.pre_norm = cfg.norm_placement == "pre"
        self.attn_norm = make_norm(cfg, cfg.d_model)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg, cfg.d_model)
        self.mlp: nn.Module = SwiGLU(cfg) if cfg.mlp == "swiglu" else GeluMLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        kv: LayerKV | None = None,
        start_pos: int = 0,
        docs: DocumentAttention | None = None,
    ) -> Tensor:
        """pre: x + f(norm(x)); post: norm(x + f(x)); for f = attention, then f = MLP."""
        if self.pre_norm:
            x = x + self.drop(self.attn(_autocast_input(self.attn_norm(x)), rope, kv, start_pos, docs))
            return x + self.drop(self.mlp(_autocast_input(self.mlp_norm(x))))
        x = self.attn_norm(x + self.drop(self.attn(_autocast_input(x), rope, kv, start_pos, docs)))
        return self.mlp_norm(x + self.drop(self.mlp(_autocast_input(x))))


def _autocast_input(h: Tensor) -> Tensor:
    """``h`` in autocast's compute dtype when autocast is on, else ``h`` unchanged.

    Attention reads its input with three linears and SwiGLU with two; autocast would cast the fp32
    input once per linear (and keep each copy for backward). Casting once here saves the copies.
    """
    device = h.device.type
    if torch.is_autocast_enabled(device):
        return h.to(torch.get_autocast_dtype(device))
    return h


def _attention_dtype(x: Tensor) -> torch.dtype:
    """The dtype attention will run in for the residual stream ``x``: autocast's, else ``x``'s."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class Transformer(nn.Module):
    """Decoder-only language model: embeddings, ``n_layers`` blocks, final norm, output head.

    The final norm is applied for both norm placements; with post-norm it directly follows the last
    block's own norm (redundant but harmless), so both placements share one state-dict layout. With
    ``tie_embeddings`` the head reuses ``embed.weight`` and there is no ``lm_head`` parameter.
    """

    def __init__(self, cfg: ModelSection) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.position == "learned" else None
        if cfg.position == "sinusoidal":
            # non-persistent: not in the state dict; refill_buffers() re-fills it after to_empty()
            self.register_buffer("pos_table", sinusoidal_table(cfg.max_seq_len, cfg.d_model), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = make_norm(cfg, cfg.d_model)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

        ac = cfg.activation_checkpointing
        self._checkpointed = [ac == "every" or (isinstance(ac, int) and i % ac == 0) for i in range(cfg.n_layers)]
        if cfg.compile:
            for block in self.blocks:
                # Module.compile() compiles in place, so state-dict keys keep their names
                # (torch.compile(block) would insert "_orig_mod.").
                block.compile()

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Initialise every parameter deterministically from ``seed`` (``initial_value``), independent of
        the global RNG and of where the model lives; also re-fills the non-persistent buffers."""
        for name, p in self.named_parameters():
            p.copy_(self.initial_value(name, p.shape, seed))
        self.refill_buffers()

    def initial_value(self, name: str, shape: Sequence[int], seed: int) -> Tensor:
        """The initial value of parameter ``name`` (of full shape ``shape``): fp32, on the CPU.

        Linear and embedding weights ~ N(0, init_std), residual output projections (attention
        ``o_proj``, MLP ``down_proj``/``fc_out``) ~ N(0, init_std / sqrt(2 * n_layers)), biases 0,
        norm weights 1. Each parameter draws from its own generator seeded by (seed, name), so the
        result is bit-identical across processes and ranks and does not depend on parameter order;
        ZeRO-3 (``bigtx.zero3``) writes these values into the gathered parameters one by one.
        """
        value = torch.empty(tuple(shape), dtype=torch.float32, device="cpu")
        owner = self.get_submodule(name.rpartition(".")[0])
        if name.endswith(".bias"):
            return value.zero_()
        if isinstance(owner, (RMSNorm, nn.LayerNorm)):
            return value.fill_(1.0)
        std = self.cfg.init_std
        if name.endswith(_RESIDUAL_PROJECTIONS):
            std = std / math.sqrt(2 * self.cfg.n_layers)
        digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
        gen = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        return value.normal_(0.0, std, generator=gen)

    @torch.no_grad()
    def refill_buffers(self) -> None:
        """Recompute the non-persistent buffers (the sinusoidal position table) in fp32 on their device:
        they are in no state dict or weights file, ``to_empty`` leaves them uninitialised, and under
        ``deepspeed.zero.Init`` they are computed in the parameter dtype (positions rounded to bf16)."""
        if self.cfg.position == "sinusoidal":
            table = sinusoidal_table(self.cfg.max_seq_len, self.cfg.d_model)
            self.register_buffer("pos_table", table.to(self.pos_table.device), persistent=False)

    def forward(
        self,
        input_ids: Tensor,
        targets: Tensor | None = None,
        cache: KVCache | None = None,
        documents: Documents | None = None,
    ) -> Tensor:
        """Logits [B, T, vocab] for ``input_ids`` [B, T], or the mean cross-entropy if ``targets`` is given.

        ``targets`` [B, T] holds the token that should follow each position (-100: ignored); the loss
        is an fp32 scalar even under bf16 autocast. With ``cache``, the tokens sit at positions
        ``cache.length``.. and their keys/values are appended to it (activation checkpointing is off).
        With ``documents`` (packed rows, ``bigtx.model.documents``), each token attends only to its own
        document and positions restart at each document's start: every document gets the logits it
        would get alone.
        """
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"positions up to {start + T} exceed model.max_seq_len={self.cfg.max_seq_len}")
        if documents is not None and cache is not None:
            raise ValueError("documents and cache exclude each other: decoding runs one sequence per row")

        positions = documents.positions if documents is not None else None
        x = self.embed(input_ids)
        if self.pos_embed is not None:
            x = x + self.pos_embed(
                torch.arange(start, start + T, device=input_ids.device) if positions is None else positions
            )
        elif self.cfg.position == "sinusoidal":
            x = x + (self.pos_table[start : start + T] if positions is None else self.pos_table[positions])
        x = self.drop(x)

        rope = None
        if self.cfg.position == "rope" and positions is None:
            rope = rope_tables(start, T, self.cfg.head_dim, self.cfg.rope_theta, input_ids.device)
        elif self.cfg.position == "rope":
            rope = rope_tables_at(positions, self.cfg.head_dim, self.cfg.rope_theta)
        docs = None
        if documents is not None:
            attention_dropout = self.cfg.dropout > 0 and self.training
            docs = attention_inputs(documents, _attention_dtype(x), attention_dropout)
        recompute = cache is None and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if cache is not None:
                x = block(x, rope, cache.layers[i], start)
            elif recompute and self._checkpointed[i]:
                # non-reentrant: works with parameters that ZeRO-3 gathers inside the forward
                x = checkpoint(block, x, rope, docs=docs, use_reentrant=False)
            else:
                x = block(x, rope, docs=docs)
        if cache is not None:
            cache.length = start + T

        x = self.final_norm(x)
        logits = F.linear(x, self.embed.weight) if self.lm_head is None else self.lm_head(x)
        if targets is None:
            return logits
        # fp32 softmax in cache-sized chunks, no full-size fp32 copy; nothing else holds these logits,
        # so their storage takes the gradient (bigtx.model.loss). A forward hook on lm_head that kept
        # its output would see the gradient there after backward.
        return cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, overwrite_logits=True)

    def new_cache(self, max_len: int | None = None) -> KVCache:
        """An empty KV cache for up to ``max_len`` positions (default ``max_seq_len``)."""
        return KVCache(self.cfg.n_layers, max_len or self.cfg.max_seq_len)

    def num_params(self) -> int:
        """Number of parameters held by this module (tied weights once); equals ``cfg.num_params()``."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token at ``seq_len`` (``ModelSection.flops_per_token``)."""
        return self.cfg.flops_per_token(seq_len)

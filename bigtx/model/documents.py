"""Documents inside packed rows (``data.document_mask``): where each starts, each token's position in
its document, and the attention inputs that keep documents apart.

Rows are cut from one stream of EOS-terminated documents (``bigtx.data.packing``), so a row's documents
can be read off its input ids: a document ends with, and includes, its EOS; the next starts right after.
A row may start in the middle of a document; that piece is a document of its own with positions from
0, since the part before it lies in another row, which attention never reaches anyway.

Two attention paths, chosen per forward by ``attention_inputs``: on CUDA with 16-bit activations and no
attention dropout, FlashAttention's variable-length kernel (``torch.nn.attention.varlen.varlen_attn``)
over the documents laid end to end, which computes nothing across documents; elsewhere
``F.scaled_dot_product_attention`` with an additive block-diagonal causal mask, which computes every
query-key pair of a row and masks the pairs between documents.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# FlashAttention's kernels (varlen_attn's only backend) take these dtypes only.
_VARLEN_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Documents:
    """Where the documents of a batch of packed rows lie."""

    ids: Tensor  # [B, T] int64: index of each token's document in its row (0 for the row's first piece)
    positions: Tensor  # [B, T] int64: each token's position in its document, 0 at the document's first token


@dataclass(frozen=True)
class DocumentAttention:
    """What attention needs to keep documents apart: ``bias`` for SDPA, or ``cu_seqlens`` for varlen."""

    bias: Tensor | None = None  # [B, 1, T, T], 0 where a query may attend a key, -inf elsewhere
    cu_seqlens: Tensor | None = None  # [N + 1] int32: start of each of the N documents in the flattened batch
    max_len: int = 0  # tokens in the longest document (varlen only)


def find_documents(input_ids: Tensor, eos_id: int) -> Documents:
    """The documents of ``input_ids`` [B, T]: each ends at an ``eos_id`` token (which belongs to it)."""
    if input_ids.ndim != 2:
        raise ValueError(f"expected input ids [B, T], got shape {tuple(input_ids.shape)}")
    is_eos = (input_ids == eos_id).long()
    # the EOS tokens strictly before a token count the documents that ended before it
    ids = is_eos.cumsum(1) - is_eos
    index = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    # first token of each token's document: one past the last EOS strictly before it (0 if none)
    after_eos = torch.where(is_eos.bool(), index + 1, 0).cummax(1).values
    starts = torch.nn.functional.pad(after_eos[:, :-1], (1, 0))
    return Documents(ids, index - starts)


def uses_varlen(device: torch.device, dtype: torch.dtype, attention_dropout: bool) -> bool:
    """Whether attention takes the variable-length FlashAttention path (see the module docstring)."""
    return device.type == "cuda" and dtype in _VARLEN_DTYPES and not attention_dropout


def attention_inputs(docs: Documents, dtype: torch.dtype, attention_dropout: bool) -> DocumentAttention:
    """The attention inputs for ``docs`` when attention runs in ``dtype``, built once per forward and shared
    by every layer.

    The SDPA mask is additive and already in ``dtype``: SDPA converts a boolean mask to that form on
    every call and keeps each copy for the backward, one [B, 1, T, T] tensor per layer instead of one.
    """
    if uses_varlen(docs.ids.device, dtype, attention_dropout):
        # row boundaries are document boundaries too, so the starts in the flattened batch are where
        # positions are 0
        flat = docs.positions.flatten()
        starts = torch.nonzero(flat == 0).squeeze(1)
        cu = torch.cat([starts, starts.new_tensor([flat.shape[0]])]).to(torch.int32)
        # the kernel takes the longest length as a Python int: one device-to-host sync per forward
        return DocumentAttention(cu_seqlens=cu, max_len=int((cu[1:] - cu[:-1]).max()))
    T = docs.ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=docs.ids.device).tril()
    allowed = (docs.ids[:, :, None] == docs.ids[:, None, :]) & causal
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))
    return DocumentAttention(bias=bias[:, None])

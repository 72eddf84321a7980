"""Cross-entropy over a large vocabulary without full-size fp32 intermediates.

``F.cross_entropy(logits.float(), targets)`` (what Hugging Face models and most trainers do) writes
an fp32 copy of the logits, keeps an fp32 log-softmax of the same size for the backward, and in the
backward fills, reads and writes three more tensors of that size. At B*T = 16k tokens and a 50k
vocabulary each of those is 3.2 GB. ``cross_entropy`` below does the same arithmetic in row chunks
whose fp32 temporaries stay small: the forward keeps only the logits (already alive, in their own
dtype) and the backward recomputes each chunk's softmax from them and writes the gradient once,
optionally into the logits' own storage, so the backward's memory peak holds no second logits-sized
tensor either.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

# Bytes of one fp32 chunk of logits (a chunk holds two such temporaries: the fp32 copy of bf16/fp16
# logits and its (log-)softmax). On the CPU: about one core's L2 cache, so a chunk's
# softmax is read back from cache (its effect on a training step: tools/bench_model.py).
# Elsewhere: few enough chunks that launch overhead is nil, while the fp32 temporary stays bounded.
_CHUNK_BYTES = {"cpu": 2 * 2**20}
_CHUNK_BYTES_DEFAULT = 256 * 2**20


class CrossEntropyParts(NamedTuple):
    """The loss to differentiate and its parts (fp32 scalars; the parts carry no gradient)."""

    total: Tensor  # ce + z_loss * z
    ce: Tensor  # mean cross-entropy over counted rows
    z: Tensor  # mean over counted rows of logsumexp(logits)**2, without the coefficient (0 when z_loss is 0)


def cross_entropy(
    logits: Tensor, targets: Tensor, ignore_index: int = -100, *, overwrite_logits: bool = False
) -> Tensor:
    """Mean cross-entropy (fp32 scalar) of ``logits`` [N, V] against ``targets`` [N].

    Equals ``F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)`` up to fp32
    summation order: softmax and log-softmax run in fp32 whatever the logits' dtype, and the
    gradient is scaled by the incoming gradient (e.g. an fp16 loss scale) before it is rounded to
    the logits' dtype. Targets equal to ``ignore_index`` contribute neither loss nor gradient; if
    every target is ignored the loss is NaN and the gradient zero, as with ``F.cross_entropy``.

    With ``overwrite_logits`` the backward writes the gradient into ``logits`` itself: for callers
    that own the logits and read nothing from them after the backward (``Transformer.forward``).
    A second backward through the same graph then fails autograd's in-place check instead of
    computing from clobbered values.
    """
    return cross_entropy_parts(logits, targets, ignore_index, overwrite_logits=overwrite_logits).total


def cross_entropy_parts(
    logits: Tensor, targets: Tensor, ignore_index: int = -100, *, z_loss: float = 0.0, overwrite_logits: bool = False
) -> CrossEntropyParts:
    """``cross_entropy`` plus the z-loss of PaLM (Chowdhery et al., 2022): ``total = ce + z_loss * z``,
    ``z`` the mean over counted rows of ``log(Z)**2``, ``log(Z) = logsumexp`` of the row's fp32 logits.

    The z term pulls ``log(Z)`` towards 0, which keeps the softmax normaliser from drifting (a source of
    bf16 loss spikes). It is computed in the same chunks as the cross-entropy, and its gradient,
    ``2 * z_loss * log(Z) * softmax``, goes into the same single gradient write. With ``z_loss`` 0
    nothing extra is computed: ``total`` and its gradient equal ``cross_entropy`` bit for bit, and
    ``z`` is 0. ``ce`` is the same number whatever ``z_loss``.
    """
    if logits.ndim != 2 or targets.shape != logits.shape[:1] or logits.shape[1] == 0:
        shapes = f"{tuple(logits.shape)} and {tuple(targets.shape)}"
        raise ValueError(f"expected logits [N, V > 0] and targets [N], got {shapes}")
    if not z_loss >= 0.0 or z_loss == float("inf"):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss}")
    total, ce, z = _ChunkedCrossEntropy.apply(
        logits, targets, ignore_index, chunk_rows(logits), float(z_loss), overwrite_logits
    )
    return CrossEntropyParts(total, ce, z)


def chunk_rows(logits: Tensor) -> int:
    """Rows of ``logits`` [N, V] per chunk: an fp32 chunk of them fills the device's chunk budget."""
    chunk_bytes = _CHUNK_BYTES.get(logits.device.type, _CHUNK_BYTES_DEFAULT)
    return max(1, chunk_bytes // (4 * logits.shape[1]))


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, logits: Tensor, targets: Tensor, ignore_index: int, rows: int, z_loss: float, overwrite: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, 0)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        z_total = torch.zeros((), dtype=torch.float32, device=logits.device)
        lse_rows: list[Tensor] = []
        for start in range(0, logits.shape[0], rows):
            end = start + rows
            chunk = logits[start:end].float()
            logp = torch.log_softmax(chunk, dim=-1)
            picked = logp.gather(1, safe_targets[start:end, None]).squeeze(1)
            total -= torch.where(valid[start:end], picked, 0.0).sum()
            if z_loss:
                # a second pass over the chunk while it is in cache; log_softmax keeps its logsumexp to itself
                lse = torch.logsumexp(chunk, dim=-1)
                lse_rows.append(lse)
                z_total += torch.where(valid[start:end], lse.square(), 0.0).sum()
        count = valid.sum()
        ce, z = total / count, z_total / count
        # ce's own tensor when z_loss is 0, so that path is today's arithmetic exactly
        loss = ce + z_loss * z if z_loss else ce.clone()
        # the backward needs log(Z) per row: [N] fp32, small next to the logits
        lse_all = torch.cat(lse_rows) if z_loss else z_total.new_empty(0)  # nothing saved without z-loss
        ctx.save_for_backward(logits, safe_targets, valid, count, lse_all)
        ctx.rows, ctx.z_loss, ctx.overwrite = rows, z_loss, overwrite
        ctx.mark_non_differentiable(ce, z)
        return loss, ce, z

    @staticmethod
    def backward(  # type: ignore[override]
        ctx, grad_loss: Tensor, *_unused: Tensor
    ) -> tuple[Tensor | None, None, None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        logits, safe_targets, valid, count, lse = ctx.saved_tensors
        rows: int = ctx.rows
        z_loss: float = ctx.z_loss
        # d(mean loss)/d(logit) = (softmax - one_hot(target)) / count for each counted row, 0 otherwise;
        # the z term adds 2 * z_loss * log(Z) * softmax / count
        row_scale = valid.float() * (grad_loss.float() / count.clamp_min(1))
        grad = logits if ctx.overwrite else torch.empty_like(logits)
        for start in range(0, logits.shape[0], rows):
            end = start + rows
            probs = torch.softmax(logits[start:end].float(), dim=-1)
            if z_loss:
                probs.mul_((1.0 + 2.0 * z_loss * lse[start:end])[:, None])
            probs.scatter_add_(1, safe_targets[start:end, None], probs.new_full((probs.shape[0], 1), -1.0))
            grad[start:end] = probs.mul_(row_scale[start:end, None])
        return grad, None, None, None, None, None

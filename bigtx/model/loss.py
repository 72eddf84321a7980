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

import torch
from torch import Tensor

# Bytes of one fp32 chunk of logits (a chunk holds two such temporaries: the fp32 copy of bf16/fp16
# logits and its (log-)softmax). On the CPU: about one core's L2 cache, so a chunk's
# softmax is read back from cache (its effect on a training step: tools/bench_model.py).
# Elsewhere: few enough chunks that launch overhead is nil, while the fp32 temporary stays bounded.
_CHUNK_BYTES = {"cpu": 2 * 2**20}
_CHUNK_BYTES_DEFAULT = 256 * 2**20


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
    if logits.ndim != 2 or targets.shape != logits.shape[:1] or logits.shape[1] == 0:
        shapes = f"{tuple(logits.shape)} and {tuple(targets.shape)}"
        raise ValueError(f"expected logits [N, V > 0] and targets [N], got {shapes}")
    return _ChunkedCrossEntropy.apply(logits, targets, ignore_index, chunk_rows(logits), overwrite_logits)


def chunk_rows(logits: Tensor) -> int:
    """Rows of ``logits`` [N, V] per chunk: an fp32 chunk of them fills the device's chunk budget."""
    chunk_bytes = _CHUNK_BYTES.get(logits.device.type, _CHUNK_BYTES_DEFAULT)
    return max(1, chunk_bytes // (4 * logits.shape[1]))


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, ignore_index: int, rows: int, overwrite: bool) -> Tensor:  # type: ignore[override]
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, 0)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], rows):
            end = start + rows
            logp = torch.log_softmax(logits[start:end].float(), dim=-1)
            picked = logp.gather(1, safe_targets[start:end, None]).squeeze(1)
            total -= torch.where(valid[start:end], picked, 0.0).sum()
        count = valid.sum()
        ctx.save_for_backward(logits, safe_targets, valid, count)
        ctx.rows, ctx.overwrite = rows, overwrite
        return total / count

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor | None, None, None, None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        logits, safe_targets, valid, count = ctx.saved_tensors
        rows: int = ctx.rows
        # d(mean loss)/d(logit) = (softmax - one_hot(target)) / count for each counted row, 0 otherwise
        row_scale = valid.float() * (grad_loss.float() / count.clamp_min(1))
        grad = logits if ctx.overwrite else torch.empty_like(logits)
        for start in range(0, logits.shape[0], rows):
            end = start + rows
            probs = torch.softmax(logits[start:end].float(), dim=-1)
            probs.scatter_add_(1, safe_targets[start:end, None], probs.new_full((probs.shape[0], 1), -1.0))
            grad[start:end] = probs.mul_(row_scale[start:end, None])
        return grad, None, None, None, None

"""bigtx.model.loss: the chunked cross-entropy equals torch's in value and gradient."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bigtx.model import loss as loss_module
from bigtx.model.loss import cross_entropy


def _case(dtype: torch.dtype, n: int = 70, vocab: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(n, vocab, generator=gen)).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[::5] = -100
    return logits, targets


def _loss_and_grad(fn, logits: torch.Tensor, targets: torch.Tensor, scale: float = 1.0):  # type: ignore[no-untyped-def]
    leaf = logits.clone().requires_grad_()
    loss = fn(leaf, targets)
    (loss * scale).backward()
    assert leaf.grad is not None
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_bytes", [4 * 300 * 7, 4 * 300 * 1000])  # 7 rows per chunk (ragged end), one chunk
def test_matches_torch_cross_entropy(dtype: torch.dtype, chunk_bytes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(loss_module._CHUNK_BYTES, "cpu", chunk_bytes)
    logits, targets = _case(dtype)
    ref_loss, ref_grad = _loss_and_grad(lambda x, t: F.cross_entropy(x.float(), t, ignore_index=-100), logits, targets)
    loss, grad = _loss_and_grad(cross_entropy, logits, targets)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert grad.dtype == dtype
    # fp32: exact up to summation order; half types: at most one rounding of the same fp32 value apart
    tol = {torch.float32: 1e-7, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=tol, atol=1e-7)
    assert torch.all(grad[targets == -100] == 0)


def test_gradient_is_scaled_before_rounding_to_fp16() -> None:
    # An fp16 loss scale must be applied in fp32: (p - 1)/N underflows fp16 for small p otherwise.
    logits, targets = _case(torch.float16, n=4096, vocab=64)
    ref_loss, ref_grad = _loss_and_grad(
        lambda x, t: F.cross_entropy(x.float(), t, ignore_index=-100), logits, targets, scale=2.0**16
    )
    _, grad = _loss_and_grad(cross_entropy, logits, targets, scale=2.0**16)
    assert torch.count_nonzero(grad) == torch.count_nonzero(ref_grad)
    # one fp16 ulp apart at most (normal and subnormal range)
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=2**-10, atol=2**-23)


def test_all_targets_ignored_gives_nan_loss_and_zero_gradient_like_torch() -> None:
    logits = torch.randn(3, 10)
    targets = torch.full((3,), -100)
    for fn in (cross_entropy, lambda x, t: F.cross_entropy(x, t, ignore_index=-100)):
        loss, grad = _loss_and_grad(fn, logits, targets)
        assert math.isnan(loss.item())
        assert torch.equal(grad, torch.zeros_like(logits))


def test_shape_mismatch_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"logits \[N, V > 0\] and targets \[N\]"):
        cross_entropy(torch.randn(2, 3, 10), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="V > 0"):
        cross_entropy(torch.randn(2, 0), torch.zeros(2, dtype=torch.long))


def test_overwrite_logits_gives_the_same_upstream_gradients_and_guards_a_second_backward() -> None:
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(40, 16, generator=gen), torch.randn(300, 16, generator=gen)
    targets = torch.randint(0, 300, (40,), generator=gen)
    grads = []
    for overwrite in (False, True):
        leaf = w.clone().requires_grad_()
        loss = cross_entropy(x @ leaf.t(), targets, overwrite_logits=overwrite)
        loss.backward(retain_graph=True)
        assert leaf.grad is not None
        grads.append(leaf.grad.clone())
        if overwrite:
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                loss.backward()
        else:
            loss.backward()  # the plain path may be differentiated again
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)

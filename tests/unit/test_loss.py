"""bigtx.model.loss: the chunked cross-entropy (and its z-loss) equals torch's in value and gradient."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bigtx.model import loss as loss_module
from bigtx.model.loss import cross_entropy, cross_entropy_parts


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


def _z_reference(logits: torch.Tensor, targets: torch.Tensor, z_loss: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ce + z_loss * mean(logsumexp**2) over counted rows, and its gradient, by fp64 autograd."""
    leaf = logits.double().requires_grad_()
    valid = targets != -100
    ce = F.cross_entropy(leaf, targets, ignore_index=-100)
    total = ce + z_loss * torch.logsumexp(leaf, dim=-1)[valid].square().mean()
    total.backward()
    assert leaf.grad is not None
    return total.detach(), leaf.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("z_loss", [1e-4, 1e-2])
@pytest.mark.parametrize("chunk_bytes", [4 * 300 * 7, 4 * 300 * 1000])
def test_z_loss_matches_an_fp64_reference(
    dtype: torch.dtype, z_loss: float, chunk_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(loss_module._CHUNK_BYTES, "cpu", chunk_bytes)
    logits, targets = _case(dtype)
    logits = logits + 4  # log(Z) around 10, so the z term is far from 0 and its gradient matters
    ref_loss, ref_grad = _z_reference(logits, targets, z_loss)
    leaf = logits.clone().requires_grad_()
    parts = cross_entropy_parts(leaf, targets, z_loss=z_loss)
    (parts.total * 3.0).backward()  # an incoming gradient other than 1 scales the z term's gradient too
    assert leaf.grad is not None and leaf.grad.dtype == dtype
    torch.testing.assert_close(parts.total.double(), ref_loss, rtol=1e-6, atol=0)
    valid = targets != -100
    z_ref = torch.logsumexp(logits.double(), dim=-1)[valid].square().mean()
    torch.testing.assert_close(parts.z.double(), z_ref, rtol=1e-6, atol=0)
    assert parts.total == parts.ce + z_loss * parts.z
    tol = {torch.float32: 1e-6, torch.bfloat16: 2**-8}[dtype]
    torch.testing.assert_close(leaf.grad.double(), 3.0 * ref_grad, rtol=tol, atol=1e-8)
    assert torch.all(leaf.grad[~valid] == 0)
    # the z term is visible in the gradient: it is not the cross-entropy's alone
    _, ce_grad = _loss_and_grad(cross_entropy, logits, targets)
    assert not torch.allclose(leaf.grad.float(), 3.0 * ce_grad.float(), rtol=tol, atol=1e-8)


def _previous_chunked_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss and gradient as bigtx computed them before the z-loss, operation for operation."""
    valid = targets != -100
    safe = torch.where(valid, targets, 0)
    total = torch.zeros((), dtype=torch.float32)
    for start in range(0, logits.shape[0], rows):
        logp = torch.log_softmax(logits[start : start + rows].float(), dim=-1)
        total -= torch.where(
            valid[start : start + rows], logp.gather(1, safe[start : start + rows, None]).squeeze(1), 0.0
        ).sum()
    count = valid.sum()
    row_scale = valid.float() * (torch.ones(()) / count.clamp_min(1))
    grad = torch.empty_like(logits)
    for start in range(0, logits.shape[0], rows):
        probs = torch.softmax(logits[start : start + rows].float(), dim=-1)
        probs.scatter_add_(1, safe[start : start + rows, None], probs.new_full((probs.shape[0], 1), -1.0))
        grad[start : start + rows] = probs.mul_(row_scale[start : start + rows, None])
    return total / count, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_z_loss_zero_is_the_previous_loss_bit_for_bit(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(loss_module._CHUNK_BYTES, "cpu", 4 * 300 * 7)
    logits, targets = _case(dtype)
    ref_loss, ref_grad = _previous_chunked_cross_entropy(logits, targets, rows=7)
    for fn in (cross_entropy, lambda x, t: cross_entropy_parts(x, t, z_loss=0.0).total):
        loss, grad = _loss_and_grad(fn, logits, targets)
        assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad)
    parts = cross_entropy_parts(logits, targets)
    assert torch.equal(parts.ce, ref_loss) and parts.z == 0


def test_z_loss_leaves_the_cross_entropy_part_unchanged() -> None:
    logits, targets = _case(torch.bfloat16)
    assert torch.equal(cross_entropy_parts(logits, targets, z_loss=1e-2).ce, cross_entropy(logits, targets))


@pytest.mark.parametrize("z_loss", [-1e-4, float("nan"), float("inf")])
def test_bad_z_loss_is_a_clear_error(z_loss: float) -> None:
    logits, targets = _case(torch.float32)
    with pytest.raises(ValueError, match="z_loss must be a finite number >= 0"):
        cross_entropy_parts(logits, targets, z_loss=z_loss)

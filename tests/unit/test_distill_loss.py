"""bigtx.model.distill_loss: the chunked CE + KD loss equals a plain fp64 reference in value and gradient."""

from __future__ import annotations

import math
import weakref

import pytest
import torch
import torch.nn.functional as F

from bigtx.model import loss as loss_module
from bigtx.model.distill_loss import distill_loss
from bigtx.model.loss import cross_entropy

N, VOCAB = 70, 300


def _case(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    student = (3 * torch.randn(N, VOCAB, generator=gen)).to(dtype)
    # Correlated with the student, as a teacher is, and without ties (even in bf16) so that the top-k
    # set is unambiguous: each row is a permutation of VOCAB distinct values, exact in bf16 (|x| < 8,
    # spacing 2**-5), ordered like the student's logits plus noise.
    ranks = (student.float() + 2 * torch.randn(N, VOCAB, generator=gen)).argsort(dim=-1).argsort(dim=-1)
    teacher = ((ranks - VOCAB / 2) * 2**-5).to(dtype)
    targets = torch.randint(0, VOCAB, (N,), generator=gen)
    targets[::5] = -100
    return student, teacher, targets


def _reference(
    student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, alpha: float, T: float, kind: str, top_k: int
) -> tuple[torch.Tensor, ...]:
    """(total, ce, kd, teacher_ce) and d total / d student, all in fp64 on full-size tensors."""
    s = student.double().requires_grad_()
    t = teacher.double()
    ce = F.cross_entropy(s, targets, ignore_index=-100)
    teacher_ce = F.cross_entropy(t, targets, ignore_index=-100)
    s_kd, t_kd = s, t
    if top_k:
        ids = t.topk(top_k, dim=-1).indices
        s_kd, t_kd = s.gather(1, ids), t.gather(1, ids)
    log_q, log_p = F.log_softmax(s_kd / T, dim=-1), F.log_softmax(t_kd / T, dim=-1)
    # F.kl_div(input, target) = KL(target || input)
    if kind == "forward_kl":
        kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    else:
        kl = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
    kd = T**2 * kl[targets != -100].mean()
    total = (1 - alpha) * ce + alpha * kd
    total.backward()
    assert s.grad is not None
    return total.detach(), ce.detach(), kd.detach(), teacher_ce.detach(), s.grad


def _run(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, scale: float = 1.0, **kwargs):  # type: ignore[no-untyped-def]
    leaf = student.clone().requires_grad_()
    losses = distill_loss(leaf, teacher, targets, **kwargs)
    (losses.total * scale).backward()
    assert leaf.grad is not None
    return losses, leaf.grad


def _no_ties_at_top_k(teacher: torch.Tensor, k: int) -> bool:
    top = teacher.float().topk(k + 1, dim=-1).values
    return bool(torch.all(top[:, k - 1] > top[:, k]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("top_k", [0, 5])
@pytest.mark.parametrize("chunk_bytes", [4 * VOCAB * 7, 4 * VOCAB * 1000])  # 7 rows per chunk (ragged end), one chunk
def test_matches_fp64_reference(
    dtype: torch.dtype, temperature: float, kind: str, top_k: int, chunk_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(loss_module._CHUNK_BYTES, "cpu", chunk_bytes)
    student, teacher, targets = _case(dtype)
    if top_k:
        assert _no_ties_at_top_k(teacher, top_k)
    alpha = 0.7
    *ref_values, ref_grad = _reference(student, teacher, targets, alpha, temperature, kind, top_k)
    losses, grad = _run(student, teacher, targets, alpha=alpha, temperature=temperature, kind=kind, top_k=top_k)
    assert losses.total.requires_grad and not any(v.requires_grad for v in losses[1:])
    assert losses.z == 0  # no z-loss asked for
    for value, ref in zip(losses[:4], ref_values, strict=True):
        assert value.dtype == torch.float32 and value.ndim == 0
        # fp32 arithmetic on exactly representable inputs, whatever their dtype
        torch.testing.assert_close(value.double(), ref, rtol=2e-6, atol=0)
    assert grad.dtype == dtype
    # fp32: fp32 arithmetic against fp64; bf16: plus one rounding of the gradient to bf16 (relative 2**-9)
    rtol = {torch.float32: 2e-5, torch.bfloat16: 2**-8}[dtype]
    torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=1e-9)
    assert torch.all(grad[targets == -100] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_alpha_zero_is_cross_entropy_bit_for_bit(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(loss_module._CHUNK_BYTES, "cpu", 4 * VOCAB * 7)
    student, teacher, targets = _case(dtype)
    losses, grad = _run(student, teacher, targets, alpha=0.0, temperature=2.0, kind="reverse_kl", top_k=5)
    leaf = student.clone().requires_grad_()
    ce = cross_entropy(leaf, targets)
    ce.backward()
    assert torch.equal(losses.total, ce.detach()) and torch.equal(losses.ce, ce.detach())
    assert torch.equal(grad, leaf.grad)
    assert losses.kd > 0  # still measured


def _z_term(student: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean log(Z)**2 of the counted rows, and its gradient, in fp64."""
    s = student.double().requires_grad_()
    z = torch.logsumexp(s, dim=-1)[targets != -100].square().mean()
    z.backward()
    assert s.grad is not None
    return z.detach(), s.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("z_loss", [1e-4, 1e-2])
@pytest.mark.parametrize(("alpha", "top_k"), [(0.7, 0), (0.7, 5), (1.0, 5), (0.0, 0)])
def test_z_loss_adds_the_students_z_term(
    dtype: torch.dtype, z_loss: float, alpha: float, top_k: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(loss_module._CHUNK_BYTES, "cpu", 4 * VOCAB * 7)
    student, teacher, targets = _case(dtype)
    student = student + 4  # log(Z) around 10: the z term and its gradient are far from 0
    ref_total, ref_ce, ref_kd, ref_teacher_ce, ref_grad = _reference(
        student, teacher, targets, alpha, 2.0, "forward_kl", top_k
    )
    ref_z, ref_z_grad = _z_term(student, targets)
    kwargs = {"alpha": alpha, "temperature": 2.0, "top_k": top_k}
    losses, grad = _run(student, teacher, targets, scale=3.0, z_loss=z_loss, **kwargs)
    expected = (ref_total + z_loss * ref_z, ref_ce, ref_kd, ref_teacher_ce, ref_z)
    for value, ref in zip(losses, expected, strict=True):
        torch.testing.assert_close(value.double(), ref, rtol=2e-6, atol=0)
    # the parts are those of the run without z-loss, bit for bit
    plain, _ = _run(student, teacher, targets, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(losses[1:4], plain[1:4], strict=True))
    rtol = {torch.float32: 2e-5, torch.bfloat16: 2**-8}[dtype]
    torch.testing.assert_close(grad.double(), 3.0 * (ref_grad + z_loss * ref_z_grad), rtol=rtol, atol=1e-8)
    assert torch.all(grad[targets == -100] == 0)


def test_bad_z_loss_is_a_clear_error() -> None:
    student, teacher, targets = _case(torch.float32)
    for z_loss in (-1e-4, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="z_loss must be a finite number >= 0"):
            distill_loss(student, teacher, targets, alpha=0.5, z_loss=z_loss)


def test_alpha_one_sends_no_cross_entropy_gradient() -> None:
    student, teacher, targets = _case(torch.float32)
    _, grad = _run(student, teacher, targets, alpha=1.0, temperature=2.0, top_k=5)
    # KD over the teacher's top 5 only: every other logit of a counted row gets exactly zero
    assert torch.equal((grad != 0).sum(dim=1), torch.where(targets != -100, 5, 0))


def test_gradient_is_scaled_before_rounding_to_fp16() -> None:
    # An fp16 loss scale must be applied in fp32: the KD gradient (q - p)/N underflows fp16 otherwise.
    student, teacher, targets = _case(torch.float16)
    *_, ref_grad = _reference(student, teacher, targets, 0.5, 2.0, "forward_kl", 0)
    _, grad = _run(student, teacher, targets, scale=2.0**16, alpha=0.5, temperature=2.0)
    ref_grad = ref_grad * 2.0**16
    assert torch.count_nonzero(grad) == torch.count_nonzero(ref_grad.half())
    # one fp16 rounding, plus fp32 cancellation in (q - p) of up to a few fp16 ulps near the smallest normals
    torch.testing.assert_close(grad.double(), ref_grad, rtol=2**-10, atol=2**-20)


def test_all_targets_ignored_gives_nan_values_and_zero_gradient() -> None:
    student, teacher, _ = _case(torch.float32)
    losses, grad = _run(student, teacher, torch.full((N,), -100), alpha=0.5)
    assert all(math.isnan(v.item()) for v in losses)
    assert torch.equal(grad, torch.zeros_like(student))


def test_top_k_keeps_only_the_teachers_top_k_for_the_backward() -> None:
    student, teacher, targets = _case(torch.float32)
    for top_k, kept in ((5, False), (0, True)):
        owned = teacher.clone()
        ref = weakref.ref(owned)
        leaf = student.clone().requires_grad_()
        losses = distill_loss(leaf, owned, targets, alpha=0.5, top_k=top_k)
        del owned
        assert (ref() is not None) == kept
        losses.total.backward()


def test_overwrite_logits_gives_the_same_upstream_gradients_and_guards_a_second_backward() -> None:
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(40, 16, generator=gen), torch.randn(VOCAB, 16, generator=gen)
    teacher = 3 * torch.randn(40, VOCAB, generator=gen)
    targets = torch.randint(0, VOCAB, (40,), generator=gen)
    grads = []
    for overwrite in (False, True):
        leaf = w.clone().requires_grad_()
        losses = distill_loss(x @ leaf.t(), teacher, targets, alpha=0.5, temperature=2.0, overwrite_logits=overwrite)
        losses.total.backward(retain_graph=True)
        assert leaf.grad is not None
        grads.append(leaf.grad.clone())
        if overwrite:
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                losses.total.backward()
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"teacher": torch.randn(N, VOCAB + 1)}, r"one shape \[N, V > 0\], got \(70, 300\) and \(70, 301\)"),
        ({"student": torch.randn(2, 3, 10), "teacher": torch.randn(2, 3, 10)}, r"one shape \[N, V > 0\]"),
        ({"targets": torch.zeros(N + 1, dtype=torch.long)}, r"targets \[N\] = \[70\], got \(71,\)"),
        (
            {"teacher": torch.randn(N, VOCAB).bfloat16()},
            "teacher logits are torch.bfloat16, student logits torch.float32",
        ),
        ({"teacher": torch.randn(N, VOCAB, requires_grad=True)}, r"torch.no_grad\(\)"),
        ({"alpha": 1.5}, r"alpha must be in \[0, 1\], got 1.5"),
        ({"temperature": 0.0}, "temperature must be > 0, got 0.0"),
        ({"kind": "js"}, "kind must be 'forward_kl' or 'reverse_kl', got 'js'"),
        ({"top_k": VOCAB + 1}, r"top_k must be in \[0, V=300\], got 301"),
        ({"top_k": -1}, r"top_k must be in \[0, V=300\], got -1"),
    ],
)
def test_bad_inputs_are_clear_errors(change: dict, message: str) -> None:
    student, teacher, targets = _case(torch.float32)
    args = {"student": student, "teacher": teacher, "targets": targets, "alpha": 0.5, **change}
    tensors = [args.pop(name) for name in ("student", "teacher", "targets")]
    with pytest.raises(ValueError, match=message):
        distill_loss(*tensors, **args)


@pytest.mark.parametrize("top_k", [0, 5])
def test_no_full_size_temporary_is_allocated(top_k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    chunk_bytes = 2**18
    monkeypatch.setitem(loss_module._CHUNK_BYTES, "cpu", chunk_bytes)
    n, vocab = 1024, 1000  # the logits: 2 MB in bf16, 4 MB in fp32, against 256 KiB chunks
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, 16, generator=gen).bfloat16()
    head = torch.randn(vocab, 16, generator=gen).bfloat16().requires_grad_()
    teacher = torch.randn(n, vocab, generator=gen).bfloat16()
    targets = torch.randint(0, vocab, (n,), generator=gen)
    # overwrite: nothing full-size at all (the head's backward needs none); else only the bf16 gradient
    for overwrite, allowed in ((True, chunk_bytes), (False, n * vocab * 2)):
        student = hidden @ head.t()  # a non-leaf, as in the model: a leaf's gradient would be copied
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            losses = distill_loss(student, teacher, targets, alpha=0.5, temperature=2.0, top_k=top_k,
                                  overwrite_logits=overwrite)  # fmt: skip
            losses.total.backward()
        largest = max(event.self_cpu_memory_usage for event in prof.events())
        assert chunk_bytes // 2 < largest <= allowed, (overwrite, largest)

"""Cross-entropy fused with a knowledge-distillation term, in row chunks (as ``bigtx.model.loss``).

Distillation holds two logits tensors of size [N, V]: the student's and the teacher's. Writing fp32
copies of both, their softmaxes and a full-size gradient would multiply the memory of the logits
several times over. ``distill_loss`` reads both in row chunks of ``bigtx.model.loss.chunk_rows``
rows, keeps only chunk-sized fp32 temporaries, and writes the student's gradient once (optionally
into the student logits' own storage); the teacher's logits get no gradient.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from bigtx.model.loss import chunk_rows

KDKind = Literal["forward_kl", "reverse_kl"]


class TeacherTopK(NamedTuple):
    """A teacher given by its top-k tokens per row instead of its logits (a teacher cache,
    ``bigtx.teacher_cache``): what the top-k KD term and ``teacher_ce`` need, no more."""

    logprobs: Tensor  # [N, K] float: the teacher's log-softmax (temperature 1) at ``ids``, largest first
    ids: Tensor  # [N, K] int64: the token ids of the K largest teacher logits of each row
    target_logprob: Tensor  # [N] float: the teacher's log-softmax at each row's target (for teacher_ce)


class DistillLosses(NamedTuple):
    """The loss to differentiate and its parts (fp32 scalars; the parts carry no gradient)."""

    total: Tensor  # (1 - alpha) * ce + alpha * kd + z_loss * z
    ce: Tensor  # the student's cross-entropy against the targets
    kd: Tensor  # temperature**2 * mean KL divergence between the two distributions
    teacher_ce: Tensor  # the teacher's own cross-entropy against the targets
    z: Tensor  # the student's mean log(Z)**2 (bigtx.model.loss.cross_entropy_parts); 0 when z_loss is 0


def distill_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | TeacherTopK,
    targets: Tensor,
    *,
    alpha: float,
    temperature: float = 1.0,
    kind: KDKind = "forward_kl",
    top_k: int = 0,
    ignore_index: int = -100,
    z_loss: float = 0.0,
    overwrite_logits: bool = False,
) -> DistillLosses:
    """``(1 - alpha) * CE + alpha * KD`` of ``student_logits`` [N, V], with ``teacher_logits`` [N, V]
    (same dtype, no gradient) and ``targets`` [N].

    With ``s``, ``t`` one row of student and teacher logits and ``T = temperature``:

    - ``ce``: mean over counted rows of ``-log_softmax(s)[target]``; ``teacher_ce`` the same of ``t``.
      Both at temperature 1, over the full vocabulary.
    - ``kd``: ``T**2`` times the mean over counted rows of ``KL(p || q)`` (``forward_kl``) or
      ``KL(q || p)`` (``reverse_kl``), where ``p = softmax(t[S] / T)`` and ``q = softmax(s[S] / T)``.
      ``S`` is the full vocabulary when ``top_k`` is 0; otherwise the ``top_k`` token ids with the
      largest teacher logits in that row (``torch.topk`` of the fp32 teacher logits, which breaks
      ties), so both distributions are renormalised over those ``top_k`` tokens and the KD term sends
      gradient only to the student logits in ``S``. ``T**2`` keeps the KD gradient's size
      independent of ``T`` (Hinton et al., 2015).

    ``teacher_logits`` may instead be a ``TeacherTopK`` (a teacher cache): then ``top_k`` must be in
    [1, K] and its first ``top_k`` columns are ``S``, and ``teacher_ce`` comes from its
    ``target_logprob``. Since ``log_softmax`` over ``S`` is unchanged by the per-row shift from logits
    to log-probabilities, this is the same loss as the teacher's logits with the same ``top_k``, up to
    the rounding of the stored values.

    A row is counted when its target is not ``ignore_index``; other rows contribute to no term and
    get zero gradient. If no row is counted every value is NaN and the gradient zero (as with
    ``F.cross_entropy``). All arithmetic is fp32 whatever the logits' dtype; the gradient is scaled
    by the incoming gradient (an fp16 loss scale) before it is rounded to the logits' dtype. With
    ``alpha == 0`` the total and its gradient equal ``bigtx.model.loss.cross_entropy`` bit for bit.

    ``z_loss`` > 0 adds PaLM's z-loss of the student's logits, ``z_loss * z`` with ``z`` the mean over
    counted rows of ``logsumexp(s)**2`` (at temperature 1, over the full vocabulary), as
    ``bigtx.model.loss.cross_entropy_parts`` does; at 0 nothing extra is computed and ``z`` is 0.

    The teacher's logits stay referenced until the backward when ``top_k`` is 0 (the KD gradient
    needs them); with ``top_k`` > 0 only the top-k values (fp32) and ids [N, top_k] are kept.
    ``overwrite_logits``: as in ``cross_entropy``, the backward writes the gradient into
    ``student_logits``.
    """
    n, vocab = student_logits.shape if student_logits.ndim == 2 else (0, 0)
    if isinstance(teacher_logits, TeacherTopK):
        if vocab == 0:
            raise ValueError(f"expected student logits [N, V > 0], got {tuple(student_logits.shape)}")
        teacher_logits = _check_top_k(teacher_logits, n, top_k)
        teacher_tensors = list(teacher_logits)
    else:
        if student_logits.ndim != 2 or vocab == 0 or teacher_logits.shape != student_logits.shape:
            shapes = f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
            raise ValueError(f"expected student and teacher logits of one shape [N, V > 0], got {shapes}")
        if teacher_logits.dtype != student_logits.dtype:
            raise ValueError(
                f"teacher logits are {teacher_logits.dtype}, student logits {student_logits.dtype}: "
                "run the teacher in the student's precision"
            )
        teacher_tensors = [teacher_logits]
    if targets.shape != (n,):
        raise ValueError(f"expected targets [N] = [{n}], got {tuple(targets.shape)}")
    if any(t.requires_grad for t in teacher_tensors):
        raise ValueError("teacher logits require grad: run the teacher's forward under torch.no_grad()")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if kind not in ("forward_kl", "reverse_kl"):
        raise ValueError(f"kind must be 'forward_kl' or 'reverse_kl', got {kind!r}")
    if not 0 <= top_k <= vocab:
        raise ValueError(f"top_k must be in [0, V={vocab}], got {top_k}")
    if not z_loss >= 0.0 or z_loss == float("inf"):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss}")
    options = _Options(
        ignore_index,
        float(alpha),
        float(temperature),
        kind == "reverse_kl",
        top_k,
        chunk_rows(student_logits),
        float(z_loss),
    )
    return DistillLosses(*_ChunkedDistill.apply(student_logits, teacher_logits, targets, options, overwrite_logits))


def _check_top_k(teacher: TeacherTopK, n: int, top_k: int) -> TeacherTopK:
    """``teacher`` cut to its first ``top_k`` columns, fp32 and int64; raises ``ValueError`` on bad shapes."""
    k = teacher.ids.shape[-1] if teacher.ids.ndim == 2 else 0
    if teacher.logprobs.shape != (n, k) or teacher.ids.shape != (n, k) or teacher.target_logprob.shape != (n,):
        shapes = ", ".join(str(tuple(t.shape)) for t in teacher)
        raise ValueError(f"expected teacher top-k [N, K], [N, K], [N] with N = {n}, got {shapes}")
    if not 1 <= top_k <= k:
        raise ValueError(f"top_k must be in [1, K={k}] with a teacher given by its top-{k}, got {top_k}")
    return TeacherTopK(
        teacher.logprobs[:, :top_k].float(), teacher.ids[:, :top_k].long(), teacher.target_logprob.float()
    )


class _Options(NamedTuple):
    ignore_index: int
    alpha: float
    temperature: float
    reverse: bool
    top_k: int
    rows: int
    z_loss: float


def _log_softmax_at(x: Tensor, temperature: float) -> Tensor:
    return torch.log_softmax(x if temperature == 1.0 else x / temperature, dim=-1)


def _kl_rows(log_q: Tensor, log_p: Tensor, reverse: bool) -> Tensor:
    """Per row: KL(p || q) = sum p (log p - log q), or KL(q || p) if ``reverse``. From log-probs, so a
    probability that underflows to 0 contributes 0, not 0 * -inf."""
    if reverse:
        return (log_q.exp() * (log_q - log_p)).sum(dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def _kl_grad(log_q: Tensor, log_p: Tensor, reverse: bool) -> Tensor:
    """Per row: the gradient of ``_kl_rows`` with respect to the student's tempered logits (q's logits)."""
    q = log_q.exp()
    if reverse:
        # d/dz sum q (log q - log p) = q * (d - sum q d), d = log q - log p
        d = log_q - log_p
        return q * (d - (q * d).sum(dim=-1, keepdim=True))
    return q - log_p.exp()


class _ChunkedDistill(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, student: Tensor, teacher: Tensor | TeacherTopK, targets: Tensor, opt: _Options, overwrite: bool
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        cached = isinstance(teacher, TeacherTopK)
        valid = targets != opt.ignore_index
        safe_targets = torch.where(valid, targets, 0)
        ce, kd, teacher_ce, z = (torch.zeros((), dtype=torch.float32, device=student.device) for _ in range(4))
        lse_rows: list[Tensor] = []
        top_values: list[Tensor] = []
        top_ids: list[Tensor] = []
        for start in range(0, student.shape[0], opt.rows):
            end = start + opt.rows
            counted, target = valid[start:end], safe_targets[start:end, None]
            s = student[start:end].float()
            log_q1 = torch.log_softmax(s, dim=-1)
            # the same summation as cross_entropy, so that alpha = 0 reproduces it exactly
            ce -= torch.where(counted, log_q1.gather(1, target).squeeze(1), 0.0).sum()
            if opt.z_loss:
                lse = torch.logsumexp(s, dim=-1)
                lse_rows.append(lse)
                z += torch.where(counted, lse.square(), 0.0).sum()
            if cached:
                # log-probabilities differ from the logits by a per-row constant: the same top-k softmax
                t_values, ids = teacher.logprobs[start:end], teacher.ids[start:end]
                teacher_ce -= torch.where(counted, teacher.target_logprob[start:end], 0.0).sum()
            else:
                t = teacher[start:end].float()
                log_p1 = torch.log_softmax(t, dim=-1)
                teacher_ce -= torch.where(counted, log_p1.gather(1, target).squeeze(1), 0.0).sum()
                if opt.top_k:
                    t_values, ids = t.topk(opt.top_k, dim=-1)
            if opt.top_k:
                top_values.append(t_values)
                top_ids.append(ids)
                log_q = _log_softmax_at(s.gather(1, ids), opt.temperature)
                log_p = _log_softmax_at(t_values, opt.temperature)
            elif opt.temperature == 1.0:
                log_q, log_p = log_q1, log_p1
            else:
                log_q, log_p = _log_softmax_at(s, opt.temperature), _log_softmax_at(t, opt.temperature)
            kd += torch.where(counted, _kl_rows(log_q, log_p, opt.reverse), 0.0).sum()
        count = valid.sum()
        ce, kd, teacher_ce, z = ce / count, kd * opt.temperature**2 / count, teacher_ce / count, z / count
        total = (1.0 - opt.alpha) * ce + opt.alpha * kd
        if opt.z_loss:
            total = total + opt.z_loss * z
        # log(Z) per row for the z term's gradient: [N] fp32, small next to the logits
        lse_all = torch.cat(lse_rows) if opt.z_loss else z
        if opt.top_k:
            top = (torch.cat(top_values), torch.cat(top_ids))
            ctx.save_for_backward(student, safe_targets, valid, count, lse_all, *top)
        else:
            ctx.save_for_backward(student, safe_targets, valid, count, lse_all, teacher)
        ctx.opt, ctx.overwrite = opt, overwrite
        ctx.mark_non_differentiable(ce, kd, teacher_ce, z)
        return total, ce, kd, teacher_ce, z

    @staticmethod
    def backward(ctx, grad_total: Tensor, *_unused: Tensor) -> tuple[Tensor | None, None, None, None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        student, safe_targets, valid, count, lse, *teacher_saved = ctx.saved_tensors
        opt: _Options = ctx.opt
        row_scale = valid.float() * (grad_total.float() / count.clamp_min(1))
        ce_scale = row_scale * (1.0 - opt.alpha)
        # d(T² KL)/d(logit) = T² * (1/T) * d KL / d(logit / T)
        kd_scale = row_scale * (opt.alpha * opt.temperature)
        grad = student if ctx.overwrite else torch.empty_like(student)
        for start in range(0, student.shape[0], opt.rows):
            end = start + opt.rows
            s = student[start:end].float()
            chunk_grad = None
            if opt.alpha < 1.0:
                # (softmax - one_hot(target)) * scale, in cross_entropy's order of operations
                chunk_grad = torch.softmax(s, dim=-1)
                minus_one = chunk_grad.new_full((chunk_grad.shape[0], 1), -1.0)
                chunk_grad.scatter_add_(1, safe_targets[start:end, None], minus_one).mul_(ce_scale[start:end, None])
            if opt.alpha > 0.0:
                kd_grad = _kd_grad(s, [x[start:end] for x in teacher_saved], opt).mul_(kd_scale[start:end, None])
                chunk_grad = kd_grad if chunk_grad is None else chunk_grad.add_(kd_grad)
            if opt.z_loss:
                # d(z_loss * mean log(Z)^2)/d(logit) = 2 * z_loss * log(Z) * softmax / count
                z_grad = torch.softmax(s, dim=-1).mul_(
                    (2.0 * opt.z_loss * lse[start:end] * row_scale[start:end])[:, None]
                )
                chunk_grad = z_grad if chunk_grad is None else chunk_grad.add_(z_grad)
            grad[start:end] = chunk_grad
        return grad, None, None, None, None


def _kd_grad(s: Tensor, teacher_chunk: list[Tensor], opt: _Options) -> Tensor:
    """d KL / d(s / T) for one chunk of fp32 student logits ``s``, over the full vocabulary (zero off the
    top-k ids). ``teacher_chunk``: the teacher's logits, or its top-k values and ids."""
    if opt.top_k:
        t_values, ids = teacher_chunk
        log_q = _log_softmax_at(s.gather(1, ids), opt.temperature)
        sparse = _kl_grad(log_q, _log_softmax_at(t_values, opt.temperature), opt.reverse)
        return torch.zeros_like(s).scatter_(1, ids, sparse)
    (t,) = teacher_chunk
    return _kl_grad(_log_softmax_at(s, opt.temperature), _log_softmax_at(t.float(), opt.temperature), opt.reverse)

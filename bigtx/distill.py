"""The distillation teacher (``distill.teacher``): checked against the student, then loaded frozen.

``open_teacher`` reads only what describes the teacher (its spec, tokenizer, tensor names and
shapes) and refuses one that cannot teach this student: another vocabulary, another tokenizer or a
shorter context. It runs before any process group starts. A replicated teacher is then read whole
into a ``Transformer`` on every rank by ``bigtx.export.open_model(source, dtype, device)``; a sharded
one (``distill.placement``) is partitioned over the ranks by ``sharded_teacher``. Either is in the
student's dtype, in eval mode, with no parameter requiring gradients and no optimizer;
``teacher_logits`` runs its forward, ``OnlineTeacher`` gives it to the loop
(``bigtx.teacher_cache.CachedTeacher`` is the other teacher the loop knows), and a ``TeacherClock``
times it for the metrics.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bigtx import zero3
from bigtx.checkpoint import CheckpointError
from bigtx.config import DataSection, SpecError
from bigtx.data.tokenizer import ByteTokenizer, load_tokenizer
from bigtx.export import ExportError, WeightSource, open_source
from bigtx.export.consolidate import find_tokenizer_file, is_hf_dir
from bigtx.model import Transformer
from bigtx.model.documents import Documents


def open_teacher(path: str, data: DataSection, vocab_size: int) -> WeightSource:
    """The teacher's weights at ``path`` (anything ``bigtx.export.open_source`` reads), unread.

    ``data`` and ``vocab_size`` are the student's ``data`` section and ``model.vocab_size``. Raises
    ``SpecError`` with ``distill.teacher: ...`` lines when the path holds no model, or when the
    teacher's ``model.vocab_size`` or tokenizer (compared by the sha256 of its tokenizer.json, or
    both ``byte``) differ from the student's, or its ``max_seq_len`` is below ``data.seq_len``.
    """
    try:
        source = open_source(Path(path))
    except (ExportError, CheckpointError) as exc:
        raise SpecError([f"distill.teacher: {exc}"]) from None
    teacher = source.spec
    problems = []
    if teacher.model.vocab_size != vocab_size:
        problems.append(
            f"distill.teacher: the teacher's model.vocab_size is {teacher.model.vocab_size} ({source.path}), "
            f"the student's {vocab_size}; the KD term compares the two distributions token by token, so use a "
            "teacher with the student's vocabulary"
        )
    theirs, their_hash = _teacher_tokenizer(source)
    student = load_tokenizer(data.tokenizer)
    if their_hash != student.sha256:
        problems.append(
            f"distill.teacher: the teacher's tokenizer {theirs} is not the student's data.tokenizer "
            f"{data.tokenizer} (sha256 {their_hash[:12]} vs {student.sha256[:12]}); distill with a teacher "
            "trained on the student's tokenizer"
        )
    if teacher.model.max_seq_len < data.seq_len:
        problems.append(
            f"distill.teacher: the teacher's model.max_seq_len is {teacher.model.max_seq_len}, shorter than "
            f"data.seq_len={data.seq_len}; lower data.seq_len"
        )
    if problems:
        raise SpecError(problems)
    return source


def _teacher_tokenizer(source: WeightSource) -> tuple[str, str]:
    """(the teacher's tokenizer as a name or path, the sha256 bigtx records for it)."""
    if is_hf_dir(source.path) and not (source.path / "tokenizer.json").is_file():
        # the import's spec says `byte` for want of anything better, which would hide a mismatch
        raise SpecError(
            [
                f"distill.teacher: {source.path} has no tokenizer.json, so its tokenizer cannot be checked "
                "against the student's; copy the model's tokenizer.json into it"
            ]
        )
    name = source.spec.data.tokenizer
    if name == "byte":
        return "byte", ByteTokenizer.sha256
    found = find_tokenizer_file(name, source.path)
    if found is None:
        raise SpecError(
            [
                f"distill.teacher: the teacher's tokenizer {name} (data.tokenizer in its spec) is not found "
                f"beside {source.path} or from the working directory; put its tokenizer.json beside the weights"
            ]
        )
    # the same hash as HFTokenizer.sha256: of the file's bytes
    return str(found), hashlib.sha256(found.read_bytes()).hexdigest()


def sharded_teacher(source: WeightSource, ds_config: dict[str, Any], rank: int, world_size: int) -> nn.Module:
    """``source``'s weights partitioned over the ranks, in a DeepSpeed ZeRO-3 engine with no optimizer.

    Built inside ``deepspeed.zero.Init`` with ``ds_config`` (``derive_teacher_config``: its dtype and
    parameter offload), so no rank ever holds the whole teacher; each weight is read by one rank and
    scattered while it is gathered (``bigtx.zero3.write_parameters``). The engine's forward gathers each
    layer's weights as it runs and frees them after, the way ZeRO-3 trains; every rank must call it
    together. Its values equal ``open_model``'s for the same source and dtype.
    """
    import deepspeed

    cfg = source.spec.model.model_copy(update={"compile": False, "dropout": 0.0, "activation_checkpointing": "none"})
    with zero3.partitioned_construction(ds_config, enabled=True):
        model = Transformer(cfg)
    model.refill_buffers()
    zero3.write_parameters(model, lambda name, shape: source.read(name), rank, world_size)
    model.eval().requires_grad_(False)
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config)
    engine.eval()  # DeepSpeedEngine.eval returns None, not the engine
    return engine


@torch.no_grad()
def teacher_logits(teacher: nn.Module, input_ids: Tensor, documents: Documents | None = None) -> Tensor:
    """The teacher's logits [B, T, V] for ``input_ids`` [B, T], in its dtype, with no autograd history;
    with ``documents`` (``data.document_mask``) it sees each document alone, as the student does.

    ``no_grad`` rather than ``inference_mode``: ``distill_loss`` saves these logits for its backward,
    which autograd refuses for inference tensors.
    """
    return teacher(input_ids, documents=documents)


class OnlineTeacher:
    """``distill.source: online``: the frozen teacher, run on every micro-batch."""

    def __init__(self, model: nn.Module):
        self.model = model

    def outputs(self, x: Tensor, y: Tensor, at: tuple[int, int], documents: Documents | None = None) -> Tensor:
        """The teacher's logits for inputs ``x`` [B, T] (seeing each of ``documents`` alone, as the student
        does), flattened to [B * T, V]; ``y`` and ``at`` (the batch's position in the stream, which a
        cache needs) are not used."""
        return teacher_logits(self.model, x, documents).flatten(0, 1)


class TeacherClock:
    """Seconds spent in the teacher's forward passes of one step.

    On a GPU the host clock would time only the kernel launches, so each pass is bracketed by CUDA
    events instead; ``seconds`` reads them, which waits for the last one: call it after the step's
    sync point and it costs nothing. Elsewhere the host clock times the pass itself.
    """

    def __init__(self) -> None:
        self._host = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def timing(self, device: torch.device) -> Iterator[None]:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._host += time.perf_counter() - t0

    def seconds(self) -> float:
        if self._events:
            self._events[-1][1].synchronize()
        return self._host + sum(start.elapsed_time(end) for start, end in self._events) / 1e3

"""bigtx.distill: a teacher from an export, a run or a Hugging Face directory, checked and loaded frozen."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from bigtx import train
from bigtx.config import SpecError, load_spec, spec_to_dict, validate_spec
from bigtx.config.spec import ModelSection
from bigtx.data.tokenizer import train_tokenizer
from bigtx.distill import TeacherClock, open_teacher, teacher_logits
from bigtx.distributed import DistEnv
from bigtx.export import WeightSource, export_safetensors, open_model
from bigtx.export.types import expected_shapes
from bigtx.model import Transformer
from bigtx.model.distill_loss import distill_loss

STUDENT = load_spec("tiny")  # vocab 320, byte tokenizer, seq_len 64
# wider and deeper than the student, as a teacher is
TEACHER = ModelSection(preset="tiny", d_model=96, n_layers=3, d_ff=256)


def reference(cfg: ModelSection) -> Transformer:
    """A model whose every tensor differs from its init (norm weights and all), so no mapping error hides."""
    model = Transformer(cfg)
    model.init_weights(seed=7)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def export_teacher(model: Transformer, out: Path, tokenizer: str = "byte") -> Path:
    """``model`` written by `bigtx export safetensors`."""
    spec = validate_spec(
        {"model": model.cfg.model_dump(), "train": {"max_steps": 1000}, "data": {"tokenizer": tokenizer, "seq_len": 32}}
    )
    state = model.state_dict()
    source = WeightSource(out, spec, "test", expected_shapes(model.cfg), lambda key: state[key])
    export_safetensors(source, out / "teacher")
    return out / "teacher"


def run_teacher(model: Transformer, out: Path) -> Path:
    """A bigtx run directory whose newest checkpoint (universal, as `bigtx ckpt universal` writes) is ``model``."""
    spec = validate_spec({"model": model.cfg.model_dump(), "train": {"max_steps": 1000}})
    run = out / "run"
    ckpt = run / "checkpoints" / "step_00000004"
    for key, tensor in model.state_dict().items():
        (ckpt / "zero" / key).mkdir(parents=True)
        torch.save({"param": tensor.clone(), "cat_dim": 0}, ckpt / "zero" / key / "fp32.pt")
    (ckpt / "bigtx_meta.json").write_text(json.dumps({"step": 4, "zero_stage": 1, "spec": spec_to_dict(spec)}))
    (ckpt / "COMPLETE.json").write_text('{"step": 4, "files": {}}')
    (run / "checkpoints" / "newest").write_text("step_00000004\n")
    return run


def ids(seq_len: int = 64) -> torch.Tensor:
    return torch.randint(0, 320, (2, seq_len), generator=torch.Generator().manual_seed(0))


def problems(path: Path | str, tokenizer: str = "byte", vocab_size: int = 320) -> list[str]:
    data = STUDENT.data.model_copy(update={"tokenizer": tokenizer})
    with pytest.raises(SpecError) as info:
        open_teacher(str(path), data, vocab_size)
    return info.value.errors


@pytest.mark.parametrize("where", [export_teacher, run_teacher])
def test_teacher_loads_frozen_with_its_exact_weights(where, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model = reference(TEACHER)
    source = open_teacher(str(where(model, tmp_path)), STUDENT.data, STUDENT.model.vocab_size)
    teacher = open_model(source, torch.float32)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert torch.is_grad_enabled()
    logits = teacher_logits(teacher, ids())
    assert not logits.requires_grad and logits.grad_fn is None
    with torch.no_grad():
        assert torch.equal(logits, model(ids()))


def test_teacher_runs_in_the_students_precision(tmp_path: Path) -> None:
    model = reference(TEACHER)
    source = open_teacher(str(export_teacher(model, tmp_path)), STUDENT.data, STUDENT.model.vocab_size)
    teacher = open_model(source, torch.bfloat16)
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    logits = teacher_logits(teacher, ids())
    with torch.no_grad():
        expected = model.to(torch.bfloat16)(ids())
    assert logits.dtype == torch.bfloat16 and torch.equal(logits, expected)


def test_teacher_logits_feed_the_distillation_loss(tmp_path: Path) -> None:
    source = open_teacher(str(export_teacher(reference(TEACHER), tmp_path)), STUDENT.data, STUDENT.model.vocab_size)
    teacher = open_model(source, torch.float32)
    student = reference(STUDENT.model).train()
    x, y = ids()[:, :-1], ids()[:, 1:]
    losses = distill_loss(
        student(x).flatten(0, 1), teacher_logits(teacher, x).flatten(0, 1), y.flatten(), alpha=0.5, temperature=2.0
    )
    losses.total.backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert losses.teacher_ce > 0 and losses.kd > 0


def test_another_vocabulary_or_a_shorter_context_is_refused_naming_both(tmp_path: Path) -> None:
    teacher = export_teacher(reference(TEACHER.model_copy(update={"vocab_size": 384, "max_seq_len": 32})), tmp_path)
    assert problems(teacher) == [
        f"distill.teacher: the teacher's model.vocab_size is 384 ({teacher}), the student's 320; the KD term "
        "compares the two distributions token by token, so use a teacher with the student's vocabulary",
        "distill.teacher: the teacher's model.max_seq_len is 32, shorter than data.seq_len=64; lower data.seq_len",
    ]


def test_another_tokenizer_is_refused_naming_both(tmp_path: Path) -> None:
    bpe = tmp_path / "bpe.json"
    student_bpe = train_tokenizer(["the quick brown fox jumps over the lazy dog\n" * 50], 300, str(bpe))
    byte_teacher = export_teacher(reference(TEACHER), tmp_path / "byte")
    (message,) = problems(byte_teacher, tokenizer=str(bpe))
    assert message.startswith(
        f"distill.teacher: the teacher's tokenizer byte is not the student's data.tokenizer {bpe} (sha256 "
    )
    assert student_bpe.sha256[:12] in message and message.endswith("trained on the student's tokenizer")

    # the export carries a copy of its tokenizer.json: the same bytes, so the same tokenizer
    bpe_teacher = export_teacher(reference(TEACHER), tmp_path / "bpe", tokenizer=str(bpe))
    assert open_teacher(str(bpe_teacher), STUDENT.data.model_copy(update={"tokenizer": str(bpe)}), 320)
    (message,) = problems(bpe_teacher, tokenizer="byte")
    assert message.startswith(f"distill.teacher: the teacher's tokenizer {bpe_teacher / 'tokenizer.json'} is not")

    (bpe_teacher / "tokenizer.json").unlink()
    bpe.unlink()
    (message,) = problems(bpe_teacher, tokenizer="byte")
    assert message.startswith(f"distill.teacher: the teacher's tokenizer {bpe_teacher / 'tokenizer.json'} (data")
    assert message.endswith("put its tokenizer.json beside the weights")


def test_a_directory_without_a_model_is_refused(tmp_path: Path) -> None:
    (message,) = problems(tmp_path)
    assert message.startswith(f"distill.teacher: {tmp_path}: not a bigtx run directory")
    (tmp_path / "checkpoints").mkdir()
    (message,) = problems(tmp_path)
    assert message == f"distill.teacher: {tmp_path / 'checkpoints'}: no complete checkpoint yet"


def test_hugging_face_teacher_needs_its_tokenizer_and_matches_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from bigtx.export.hf import byte_tokenizer, write_tokenizer_files

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False,
    )  # fmt: skip
    hf_model = transformers.LlamaForCausalLM(config).eval()
    path = tmp_path / "hf"
    hf_model.save_pretrained(str(path))
    (message,) = problems(path)
    assert message == (
        f"distill.teacher: {path} has no tokenizer.json, so its tokenizer cannot be checked against the "
        "student's; copy the model's tokenizer.json into it"
    )
    write_tokenizer_files(byte_tokenizer(), {"eos": 256, "pad": 257}, path, 128)
    # bigtx's `byte` and its Hugging Face twin are different files: refused, as any two tokenizers are
    (message,) = problems(path)
    assert "is not the student's data.tokenizer byte" in message
    source = open_teacher(str(path), STUDENT.data.model_copy(update={"tokenizer": str(path / "tokenizer.json")}), 320)
    logits = teacher_logits(open_model(source, torch.float32), ids())
    with torch.no_grad():
        expected = hf_model(ids()).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_train_preflight_checks_the_teacher_before_any_process_group(tmp_path: Path) -> None:
    env = DistEnv(0, 1, 0, 1, "127.0.0.1", 0, "single")
    with pytest.raises(SpecError, match=f"distill.teacher: {tmp_path}: not a bigtx run directory"):
        train.preflight(load_spec("tiny", [f"distill.teacher={tmp_path}"]), env)
    teacher = export_teacher(reference(TEACHER), tmp_path)
    with pytest.raises(SpecError, match=f"distill.source: the teacher cache {tmp_path} has no manifest.json"):
        train.preflight(load_spec("tiny", [f"distill.teacher={teacher}", f"distill.source={tmp_path}"]), env)


DISTILL_PARTS = ("ce_loss", "kd_loss", "teacher_ce")  # train.loss_parts of a distill run


def test_the_metrics_window_saves_the_distill_sums_and_resumes_an_older_checkpoint() -> None:
    result = train.StepResult(torch.zeros(4), 0.0, 0.0, TeacherClock())
    window = train.LogWindow()
    for losses in ([1.25, 1.5, 0.5, 2.0], [0.75, 1.0, 0.25, 1.75]):
        window.add(losses, 0.1, result, 8, DISTILL_PARTS)
    # as a checkpoint's meta.json carries it
    resumed = train.LogWindow.restored(json.loads(json.dumps(window.saved())))
    assert (resumed.loss, resumed.steps, resumed.distill, resumed.distill_steps) == (2.0, 2, [2.5, 0.75, 3.75], 2)
    # a checkpoint from before the parts were logged: they average the steps after the resume
    older = train.LogWindow.restored({"loss": 2.0, "steps": 2})
    assert older.distill is None
    older.add([0.5, 0.25, 1.0, 3.0], 0.1, result, 8, DISTILL_PARTS)
    assert (older.loss, older.steps, older.distill, older.distill_steps) == (2.5, 3, [0.25, 1.0, 3.0], 1)
    # a plain run's window saves what it always did
    plain = train.LogWindow()
    plain.add([1.5], 0.1, result, 8, ())
    assert plain.saved() == {"loss": 1.5, "steps": 1}


def test_teacher_clock_adds_up_the_timed_passes() -> None:
    clock = TeacherClock()
    assert clock.seconds() == 0.0
    for _ in range(2):
        with clock.timing(torch.device("cpu")):
            time.sleep(0.02)
    assert 0.04 <= clock.seconds() < 0.5


def test_placement_auto_shards_the_teacher_of_a_zero3_student_only(tmp_path: Path) -> None:
    teacher = export_teacher(reference(TEACHER), tmp_path)
    sharded = {
        (stage, placement): load_spec(
            "tiny", [f"distill.teacher={teacher}", f"zero.stage={stage}", f"distill.placement={placement}"]
        ).distill.sharded(stage)
        for stage in (2, 3)
        for placement in ("auto", "replicated", "sharded")
    }
    assert sharded == {
        (2, "auto"): False, (2, "replicated"): False, (2, "sharded"): True,
        (3, "auto"): True, (3, "replicated"): False, (3, "sharded"): True,
    }  # fmt: skip
    with pytest.raises(SpecError, match="distill.placement: Input should be 'auto', 'replicated' or 'sharded'"):
        load_spec("tiny", [f"distill.teacher={teacher}", "distill.placement=zero3"])


def test_a_sharded_teachers_deepspeed_config_has_no_optimizer_and_the_students_zero3_settings() -> None:
    from bigtx.config.deepspeed_config import derive_deepspeed_config, derive_teacher_config

    spec = load_spec("tiny", ["zero.stage=3", "zero.offload_params=true", "precision=bf16"])
    student = derive_deepspeed_config(spec, 2)
    teacher = derive_teacher_config(student)
    assert "optimizer" not in teacher and "gradient_clipping" not in teacher
    assert teacher["bf16"] == {"enabled": True}
    assert teacher["zero_optimization"] == {
        **{k: v for k, v in student["zero_optimization"].items() if k != "offload_optimizer"}
    }
    # a ZeRO-2 student's teacher: ZeRO-3 with DeepSpeed's defaults
    teacher = derive_teacher_config(derive_deepspeed_config(load_spec("tiny", ["zero.stage=2"]), 2))
    assert teacher["zero_optimization"] == {
        "stage": 3,
        "memory_efficient_linear": False,
        "offload_param": {"device": "none"},
    }

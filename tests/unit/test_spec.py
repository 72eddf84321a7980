"""The run spec: presets, overrides, every cross-field rule, the derived DeepSpeed config, the CLI."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import typing
from pathlib import Path

import pytest
import torch
import yaml

from bigtx.checkpoint import spec_changes
from bigtx.cli.main import main
from bigtx.config import RunSpec, SpecError, load_spec, preset_names, spec_to_dict, validate_spec
from bigtx.config.deepspeed_config import derive_deepspeed_config
from bigtx.config.model_presets import MODEL_PRESETS
from bigtx.config.spec import DistillSection, ModelSection
from bigtx.model.weights import read_model_section


def base(**sections: dict) -> dict:
    spec = {"train": {"max_steps": 10}, "schedule": {"warmup_steps": 1}}
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value}
    return spec


def errors_of(data: dict) -> list[str]:
    with pytest.raises(SpecError) as info:
        validate_spec(data)
    return info.value.errors


def test_every_preset_validates() -> None:
    names = preset_names()
    assert {"tiny", "demo", "llama-125m", "llama-1.3b", "llama-7b", "llama-13b", "llama-70b"} <= set(names)
    for name in names:
        spec = load_spec(name)
        derive_deepspeed_config(spec, world_size=1)


def test_parameter_counts_match_standard_formulas() -> None:
    # Llama-2-7B: the published count
    assert load_spec("llama-7b").model.num_params() == 6_738_415_616
    # Llama formula: V*d (embed) + V*d (head) + L*(2d^2 + 2*d*kv + 3*d*ff + 2d) + d
    m = load_spec("llama-125m").model
    kv = m.kv_heads * m.head_dim
    L, d, V, ff = m.n_layers, m.d_model, m.vocab_size, m.d_ff
    assert m.num_params() == 2 * V * d + L * (2 * d * d + 2 * d * kv + 3 * d * ff + 2 * d) + d
    # GPT-2 small with its real vocabulary: 124,439,808
    gpt2 = ModelSection(preset="classic-125m", vocab_size=50257)
    assert gpt2.num_params() == 124_439_808


def test_unknown_key_is_named() -> None:
    errs = errors_of(base(model={"d_modle": 64}))
    assert any(e.startswith("model.d_modle: unknown field") for e in errs)


def test_wrong_type_is_named() -> None:
    errs = errors_of(base(train={"max_steps": "many"}))
    assert any(e.startswith("train.max_steps:") for e in errs)


@pytest.mark.parametrize(
    ("sections", "field"),
    [
        ({"model": {"d_model": 100, "n_heads": 8}}, "model.d_model"),
        ({"model": {"n_heads": 4, "n_kv_heads": 3}}, "model.n_kv_heads"),
        ({"data": {"seq_len": 1024}, "model": {"max_seq_len": 256}}, "data.seq_len"),
        ({"zero": {"stage": 2, "offload_params": True}}, "zero.offload_params"),
        ({"zero": {"stage": 0, "offload_optimizer": True}}, "zero.offload_optimizer"),
        ({"schedule": {"warmup_steps": 10}}, "schedule.warmup_steps"),
        ({"train": {"max_steps": 10, "max_tokens": 1000}}, "train.max_steps"),
        ({"model": {"preset": "gpt-17"}}, "model.preset"),
        ({"optim": {"lr": 1e-4, "min_lr": 1e-3}}, "optim.min_lr"),
        ({"optim": {"z_loss": -1e-4}}, "optim.z_loss"),
        ({"optim": {"z_loss": "nan"}}, "optim.z_loss"),
        ({"optim": {"z_loss": "inf"}}, "optim.z_loss"),
        ({"optim": {"z_loss": "small"}}, "optim.z_loss"),
        ({"optim": {"z_loss": [1e-4]}}, "optim.z_loss"),
    ],
)
def test_cross_field_rules_name_the_field(sections: dict, field: str) -> None:
    errs = errors_of(base(**sections))
    assert any(e.startswith(f"{field}:") for e in errs), errs


def test_neither_max_steps_nor_max_tokens() -> None:
    errs = errors_of({"train": {}, "schedule": {"warmup_steps": 0}})
    assert any(e.startswith("train.max_steps:") for e in errs)


@pytest.mark.parametrize(
    ("train", "world", "expected"),
    [
        ({"micro_batch_size": 4, "grad_accum": 2}, 2, (4, 2, 16)),
        ({"micro_batch_size": 4, "global_batch_size": 16}, 2, (4, 2, 16)),
        ({"grad_accum": 2, "global_batch_size": 16}, 2, (4, 2, 16)),
        ({"global_batch_size": 16}, 2, (8, 1, 16)),
        ({}, 1, (1, 1, 1)),
    ],
)
def test_batch_sizes_derive_the_third(train: dict, world: int, expected: tuple) -> None:
    spec = validate_spec(base(train=train))
    assert spec.batch_sizes(world) == expected


def test_inconsistent_batch_sizes_are_an_error() -> None:
    spec = validate_spec(base(train={"micro_batch_size": 4, "grad_accum": 2, "global_batch_size": 10}))
    with pytest.raises(ValueError, match="train.global_batch_size"):
        spec.batch_sizes(2)
    spec = validate_spec(base(train={"micro_batch_size": 3, "global_batch_size": 16}))
    with pytest.raises(ValueError, match="not divisible"):
        spec.batch_sizes(2)


def test_max_tokens_rounds_up_to_whole_steps() -> None:
    spec = validate_spec(
        {"train": {"max_tokens": 1000, "micro_batch_size": 2}, "data": {"seq_len": 64}, "schedule": {"warmup_steps": 0}}
    )
    assert spec.tokens_per_step(2) == 256
    assert spec.total_steps(2) == 4


def test_overrides_are_typed() -> None:
    spec = load_spec("tiny", ["train.max_steps=7", "model.tie_embeddings=false", "optim.lr=1e-3", "run.name=x"])
    assert spec.train.max_steps == 7 and spec.model.tie_embeddings is False
    assert spec.optim.lr == pytest.approx(1e-3) and spec.run.name == "x"
    with pytest.raises(SpecError, match="KEY=VALUE"):
        load_spec("tiny", ["train.max_steps"])


def test_preset_then_explicit_fields_win() -> None:
    spec = validate_spec(base(model={"preset": "llama-125m", "n_layers": 2}))
    assert spec.model.n_layers == 2
    assert spec.model.d_model == MODEL_PRESETS["llama-125m"]["d_model"]


def test_yaml_syntax_error_has_file_line_column(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: 10\n  log_every: [1, 2\n")
    with pytest.raises(SpecError) as info:
        load_spec(str(bad))
    assert f"{bad}:" in info.value.errors[0] and "YAML syntax error" in info.value.errors[0]
    line = info.value.errors[0].split(f"{bad}:")[1].split(":")[0]
    assert line.isdigit()


def test_missing_file_and_unknown_preset() -> None:
    with pytest.raises(SpecError, match="no such file"):
        load_spec("/nonexistent/spec.yaml")
    with pytest.raises(SpecError, match="neither a YAML file nor a preset"):
        load_spec("no-such-preset")


def test_every_field_has_a_description() -> None:
    def walk(model: type) -> None:
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            for ann in (field.annotation, *typing.get_args(field.annotation)):  # a section, optional or not
                if isinstance(ann, type) and issubclass(ann, RunSpec.__mro__[1]):
                    walk(ann)

    walk(RunSpec)
    schema = RunSpec.model_json_schema()
    assert schema["$defs"]["ModelSection"]["properties"]["d_model"]["description"]


def test_deepspeed_config_is_derived() -> None:
    spec = load_spec("tiny", ["precision=fp16", "zero.stage=3", "zero.offload_params=true", "train.grad_accum=2"])
    cfg = derive_deepspeed_config(spec, world_size=2)
    assert cfg["train_batch_size"] == 16
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["fp16"]["enabled"] and not cfg["bf16"]["enabled"] and cfg["fp16"]["loss_scale"] == 0
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["offload_param"] == {"device": "cpu"}
    assert cfg["gradient_clipping"] == 1.0


def test_base_file_fills_but_never_contradicts(tmp_path) -> None:
    spec = load_spec("tiny", ["deepspeed.base=zero2"])
    cfg = derive_deepspeed_config(spec, 1)
    assert cfg["zero_optimization"]["overlap_comm"] is True  # from the base file
    clash = load_spec("tiny", ["deepspeed.base=zero3"])  # spec says stage 2
    with pytest.raises(ValueError, match=r"deepspeed\.base: .*zero_optimization\.stage"):
        derive_deepspeed_config(clash, 1)
    sneaky = tmp_path / "offload.json"
    sneaky.write_text(json.dumps({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}))
    with pytest.raises(ValueError, match="offload_optimizer"):
        derive_deepspeed_config(load_spec("tiny", [f"deepspeed.base={sneaky}"]), 1)
    with pytest.raises(ValueError, match="not found"):
        derive_deepspeed_config(load_spec("tiny", ["deepspeed.base=zero9"]), 1)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``bigtx ARGS`` in this process (a subprocess per call cost seconds of imports each)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def test_cli_validate_exit_codes(tmp_path) -> None:
    ok = run_cli("config", "validate", "tiny")
    assert ok.returncode == 0, ok.stderr
    bad = run_cli("config", "validate", "tiny", "--set", "model.n_kv_heads=3", "--set", "zero.offload_params=true")
    assert bad.returncode == 2
    assert "model.n_kv_heads:" in bad.stderr and "Traceback" not in bad.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: {max_steps: 3\n")
    res = run_cli("config", "validate", str(broken))
    assert res.returncode == 2 and "YAML syntax error" in res.stderr and "Traceback" not in res.stderr


def test_cli_validate_reports_the_published_llama2_counts() -> None:
    # Llama-2-70B: grouped-query attention (8 KV heads) and d_ff 28672, as published
    assert run_cli("config", "validate", "llama-70b").stdout == "llama-70b: ok (68,976,648,192 parameters)\n"
    assert run_cli("config", "validate", "llama-13b").stdout == "llama-13b: ok (13,015,864,320 parameters)\n"
    m = load_spec("llama-70b").model
    assert (m.n_heads, m.kv_heads, m.d_ff) == (64, 8, 28672)


def test_cli_show_and_schema() -> None:
    shown = run_cli("config", "show", "llama-7b")
    assert shown.returncode == 0 and "parameters: 6738415616" in shown.stdout and "tokens_per_step" in shown.stdout
    ds = run_cli("config", "show", "tiny", "--deepspeed", "--world-size", "2")
    assert json.loads(ds.stdout)["train_batch_size"] == 8
    schema = json.loads(run_cli("config", "schema").stdout)
    assert "RunSpec" in schema["title"]
    assert run_cli("--version").stdout.startswith("bigtx ")


def test_vocab_size_is_checked_against_an_existing_tokenizer() -> None:
    small = run_cli("config", "validate", "tiny", "--set", "model.vocab_size=200")  # byte tokenizer: 258
    assert small.returncode == 2 and "model.vocab_size" in small.stderr and "Traceback" not in small.stderr
    # a tokenizer that is not built yet is checked when training starts, not here
    later = run_cli("config", "validate", "tiny", "--set", "data.tokenizer=not/built/yet.json")
    assert later.returncode == 0, later.stderr


def test_zero3_turns_off_the_global_linear_replacement(tmp_path) -> None:
    zero = derive_deepspeed_config(load_spec("tiny", ["zero.stage=3"]), 2)["zero_optimization"]
    assert zero["memory_efficient_linear"] is False  # no global F.linear replacement by zero.Init
    assert zero["reduce_bucket_size"] == 25_000_000  # not DeepSpeed's 5e8, unless a base file sets it
    based = derive_deepspeed_config(load_spec("tiny", ["zero.stage=3", "deepspeed.base=zero3"]), 2)
    assert based["zero_optimization"]["reduce_bucket_size"] == 50_000_000
    stage2 = derive_deepspeed_config(load_spec("tiny", ["zero.stage=2"]), 2)["zero_optimization"]
    assert "memory_efficient_linear" not in stage2 and "reduce_bucket_size" not in stage2
    clash = tmp_path / "linear.json"
    clash.write_text(json.dumps({"zero_optimization": {"memory_efficient_linear": True}}))
    with pytest.raises(ValueError, match="memory_efficient_linear"):
        derive_deepspeed_config(load_spec("tiny", ["zero.stage=3", f"deepspeed.base={clash}"]), 2)


def test_cpu_adamw_steps_fused_under_zero_1_to_3() -> None:
    # no temporary of the flat fp32 partition (bigtx.config.deepspeed_config)
    for stage in (1, 2, 3):
        params = derive_deepspeed_config(load_spec("tiny", [f"zero.stage={stage}"]), 2)["optimizer"]["params"]
        assert params["torch_adam"] is True and params["fused"] is True and "foreach" not in params
    assert "fused" not in derive_deepspeed_config(load_spec("tiny", ["zero.stage=0"]), 2)["optimizer"]["params"]


def test_cpu_fused_adamw_rounds_alike_for_any_alignment_and_thread_count() -> None:
    # what keeps resumes exact: a partition restored into another buffer, or run with other threads,
    # steps to the same bits (fused rounds differently from foreach, in the last bit of a few elements)
    gen = torch.Generator().manual_seed(0)
    n = 100_003
    start, grads = torch.randn(n, generator=gen), [torch.randn(n, generator=gen) for _ in range(3)]
    threads = torch.get_num_threads()
    results = []
    try:
        for offset, nthreads, fused in ((0, 1, True), (1, 1, True), (3, 2, True), (0, 1, False)):
            torch.set_num_threads(nthreads)
            buf = torch.zeros(n + offset)
            buf[offset:] = start
            p = torch.nn.Parameter(buf[offset:])
            opt = torch.optim.AdamW(
                [p], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=fused, foreach=not fused
            )
            for g in grads:
                p.grad = g.clone()
                opt.step()
            results.append(torch.cat([p.detach(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]]))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    assert not torch.equal(results[0][:n], start)
    torch.testing.assert_close(results[0], results[3], rtol=1e-6, atol=1e-7)  # the same step, rounded differently


# --- distill: optional, off by default; its paths are checked when the spec is validated


def test_distill_is_off_by_default_and_older_specs_resume() -> None:
    spec = load_spec("tiny")
    assert spec.distill is None
    saved = spec_to_dict(spec)
    del saved["distill"]  # a spec.yaml written before the section existed
    assert spec_changes(saved, spec_to_dict(spec)) == ([], [])


def test_distill_section_defaults(tmp_path: Path) -> None:
    spec = load_spec("tiny", [f"distill.teacher={tmp_path}"])
    assert spec.distill == DistillSection(
        teacher=str(tmp_path), alpha=0.5, temperature=1.0, kind="forward_kl", top_k=0, source="online"
    )
    cache = tmp_path / "logits"
    cache.mkdir()
    assert load_spec("tiny", [f"distill.teacher={tmp_path}", f"distill.source={cache}"]).distill.source == str(cache)


@pytest.mark.parametrize(
    ("override", "error"),
    [
        ("distill.alpha=1.5", "distill.alpha: Input should be less than or equal to 1"),
        ("distill.alpha=-0.1", "distill.alpha: Input should be greater than or equal to 0"),
        ("distill.alpha=half", "distill.alpha: Input should be a valid number"),
        ("distill.temperature=0", "distill.temperature: Input should be greater than 0"),
        ("distill.kind=js", "distill.kind: Input should be 'forward_kl' or 'reverse_kl'"),
        ("distill.top_k=-1", "distill.top_k: Input should be greater than or equal to 0"),
        ("distill.top_k=2.5", "distill.top_k: Input should be a valid integer"),
        ("distill.alfa=0.3", "distill.alfa: unknown field"),
    ],
)
def test_distill_bad_values_name_the_field(tmp_path: Path, override: str, error: str) -> None:
    with pytest.raises(SpecError) as info:
        load_spec("tiny", [f"distill.teacher={tmp_path}", override])
    assert any(e.startswith(error) for e in info.value.errors), info.value.errors


def test_distill_needs_a_teacher() -> None:
    with pytest.raises(SpecError) as info:
        load_spec("tiny", ["distill.alpha=0.3"])
    assert info.value.errors == ["distill.teacher: required field is missing"]


def test_distill_paths_must_be_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec_file = tmp_path / "kd.yaml"
    spec_file.write_text("train: {max_steps: 10}\nschedule: {warmup_steps: 1}\ndistill: {teacher: gone/teacher}\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError) as info:
        load_spec(str(spec_file))
    # the spec file, the field, the path as given and where it was looked for, and the fix
    assert str(info.value) == (
        f"invalid run spec in {spec_file}:\n"
        f"  distill.teacher: no directory 'gone/teacher' (relative to the working directory {tmp_path}); "
        "give a Hugging Face model directory, a `bigtx export safetensors` directory, or a bigtx run or "
        "checkpoint directory"
    )
    a_file = tmp_path / "model.safetensors"
    a_file.write_bytes(b"")
    with pytest.raises(SpecError, match=f"distill.teacher: no directory '{a_file}'; give"):
        load_spec("tiny", [f"distill.teacher={a_file}"])
    with pytest.raises(SpecError) as info:
        load_spec("tiny", [f"distill.teacher={tmp_path}", "distill.source=offline"])
    assert info.value.errors == [
        f"distill.source: no directory 'offline' (relative to the working directory {tmp_path}); "
        "give `online` or a directory written by `bigtx distill cache`"
    ]


def test_cli_validate_reports_a_missing_teacher(tmp_path: Path) -> None:
    res = run_cli("config", "validate", "tiny", "--set", f"distill.teacher={tmp_path / 'nope'}")
    assert res.returncode == 2 and "distill.teacher: no directory" in res.stderr and "Traceback" not in res.stderr


def test_a_saved_spec_reads_back_after_its_teacher_moved(tmp_path: Path) -> None:
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    data = spec_to_dict(load_spec("tiny", [f"distill.teacher={teacher}"]))
    teacher.rmdir()
    with pytest.raises(SpecError, match="distill.teacher: no directory"):
        validate_spec(data)
    # what a checkpoint's bigtx_meta.json or an export's spec.yaml holds: its weights need no teacher
    assert validate_spec(data, saved=True).distill.teacher == str(teacher)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(data))
    assert read_model_section(tmp_path) == load_spec("tiny").model


# --- data.val: a list of named sources, each evaluated on its own (val_loss/<name>)


def test_named_val_sources_validate_and_unnamed_lists_stay_mixtures() -> None:
    named = validate_spec(base(data={"val": [{"name": "web", "path": "a"}, {"name": "code-v2.1", "path": "b"}]}))
    assert named.data.val_names == ["web", "code-v2.1"]
    mixed = validate_spec(base(data={"val": [{"path": "a"}, {"path": "b", "weight": 2}]}))
    assert mixed.data.val_names == [] and [s.weight for s in mixed.data.val] == [1.0, 2.0]
    assert validate_spec(base(data={"val": "a"})).data.val_names == []


@pytest.mark.parametrize(
    "val, error",
    [
        ([{"name": "web", "path": "a"}, {"path": "b"}], "data.val[1].name: missing; name every entry"),
        ([{"name": "web", "path": "a"}, {"name": "web", "path": "b"}], "data.val[1].name: 'web' is used twice"),
        ([{"name": "web", "path": "a", "weight": 2}], "data.val[0].weight: a named val source is evaluated"),
        ([{"name": "", "path": "a"}], "data.val.list[ValSource].0.name: cannot be a metric key"),
        ([{"name": "x/y", "path": "a"}], "data.val.list[ValSource].0.name: cannot be a metric key"),
        ([{"name": "a: b", "path": "a"}], "data.val.list[ValSource].0.name: cannot be a metric key"),
        ([{"name": "-web", "path": "a"}], "data.val.list[ValSource].0.name: cannot be a metric key"),
        ([{"name": "w" * 65, "path": "a"}], "data.val.list[ValSource].0.name: cannot be a metric key"),
        ([{"name": 3, "path": "a"}], "data.val.list[ValSource].0.name: Input should be a valid string"),
        ([{"name": "web"}], "data.val.list[ValSource].0.path: required field is missing"),
        ([{"name": "web", "path": "a", "split": "val"}], "data.val.list[ValSource].0.split: unknown field"),
    ],
)
def test_named_val_sources_bad_input(val: list, error: str) -> None:
    errors = errors_of(base(data={"val": val}))
    assert any(e.startswith(error) for e in errors), errors


def test_bad_val_name_exits_2_with_the_field(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump({**base(), "data": {"val": [{"name": "web site", "path": "a"}, {"name": "b", "path": "b"}]}})
    )
    res = run_cli("config", "validate", str(spec))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "data.val.list[ValSource].0.name: cannot be a metric key" in res.stderr and "'web site'" in res.stderr


# --- optim.z_loss: off by default, older specs resume


def test_z_loss_is_off_by_default_and_older_specs_resume() -> None:
    spec = load_spec("tiny")
    assert spec.optim.z_loss == 0.0
    saved = spec_to_dict(spec)
    del saved["optim"]["z_loss"]  # a spec.yaml written before the field existed
    assert spec_changes(saved, spec_to_dict(spec)) == ([], [])
    # turning it on when resuming bends the loss curve but breaks nothing: a warning
    on = spec_to_dict(load_spec("tiny", ["optim.z_loss=1e-4"]))
    assert spec_changes(saved, on) == (["optim.z_loss: 0.0 -> 0.0001"], [])


def test_z_loss_combines_with_distill(tmp_path: Path) -> None:
    spec = load_spec("tiny", [f"distill.teacher={tmp_path}", "optim.z_loss=1e-4"])
    assert spec.optim.z_loss == 1e-4 and spec.distill is not None


def test_cli_validate_names_a_bad_z_loss() -> None:
    bad = run_cli("config", "validate", "tiny", "--set", "optim.z_loss=-1")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "optim.z_loss: Input should be greater than or equal to 0" in bad.stderr

"""`bigtx export hf|safetensors`, `bigtx import hf` and `bigtx generate` end to end.

The checkpoints come from real 2-rank `bigtx train` runs (gloo, tiny models, byte-tokenized shards),
one per ZeRO stage, trained on first use and shared by the tests of this module. Every exported
tensor is compared with DeepSpeed's own consolidation of the fp32 master weights.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from bigtx.cli.main import main
from bigtx.config import spec_to_dict, validate_spec
from bigtx.config.spec import ModelSection
from bigtx.export import WeightSource, export_safetensors, hf_weight_map, open_source
from bigtx.export.output import MARKER
from bigtx.export.types import expected_shapes
from bigtx.export.weight_map import plan, split
from bigtx.model import Transformer
from bigtx.model.weights import load_weights, tensor_files
from tests.harness import REPO, base_env, tiny_overrides, train

# name -> overrides of the tiny spec. tiny is Llama-style with 4 query and 2 key/value heads.
RUNS = {
    "zero1-llama-gqa-untied": ["zero.stage=1"],
    "zero2-llama-tied-bias": ["zero.stage=2", "model.tie_embeddings=true", "model.bias=true"],
    "zero3-gpt2-tied": ["zero.stage=3", "model.preset=classic-tiny"],
    "zero0-gpt2-untied-bf16": ["zero.stage=0", "model.preset=classic-tiny", "model.tie_embeddings=false"],
    "zero0-llama-fp32": ["zero.stage=0", "precision=fp32"],
}
NEWEST, OLDER = "step_00000004", "step_00000002"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, byte_shards: Path) -> Callable[[str], Path]:
    """name -> run directory with checkpoints at steps 2 and 4; each run is trained once, on first use."""
    root = tmp_path_factory.mktemp("export-runs")
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            run_dir = root / name
            extra = ["train.max_steps=4", "checkpoint.every_steps=2", "train.eval_every=0", "schedule.warmup_steps=1"]
            train("tiny", tiny_overrides(run_dir, byte_shards, *extra, *RUNS[name]), 2, root / "logs")
            done[name] = run_dir
        return done[name]

    return get


def masters(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The fp32 master weights as DeepSpeed consolidates them (stage 0 has no consolidation: see below)."""
    meta = json.loads((checkpoint / "bigtx_meta.json").read_text())
    if meta["zero_stage"] > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    state = torch.load(checkpoint / "mp_rank_00_model_states.pt", weights_only=False)
    if meta["spec"]["precision"] == "fp32":
        return state["module"]  # the optimizer updates the module's own fp32 weights
    return {}  # bf16: the fp32 masters have no names in the file; checked against the bf16 weights instead


def read_hf_as_bigtx(out: Path, cfg: ModelSection) -> dict[str, torch.Tensor]:
    """The tensors of a Hugging Face export, under bigtx names (through the inverse of the map)."""
    files = tensor_files(out)
    state = {}
    for conv in plan(hf_weight_map(cfg), expected_shapes(cfg)):
        with safe_open(files[conv.hf], framework="pt") as f:
            state.update(zip(conv.bigtx, split(conv, f.get_tensor(conv.hf))))
    return state


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --------------------------------------------------------------------------------------------
# DeepSpeed checkpoints of every stage -> Hugging Face.


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_export_hf_equals_the_fp32_masters_and_loads_in_transformers(
    name: str, trained: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    transformers = pytest.importorskip("transformers")
    run_dir = trained(name)
    out = tmp_path / "hf"
    sharded = name.startswith(("zero1", "zero3", "zero0-gpt2"))
    argv = ["export", "hf", str(run_dir), "--out", str(out), "--verify"]
    code, stdout, stderr = run_cli(argv + (["--max-shard-size", "200KB"] if sharded else []), capsys)
    assert code == 0, stdout + stderr
    assert f"{NEWEST} (" in stdout and "verify: ok" in stdout
    assert "greedy generation of 32 tokens: identical" in stdout
    print(stdout)

    source = open_source(run_dir)
    cfg = source.spec.model
    exported = read_hf_as_bigtx(out, cfg)
    reference = masters(run_dir / "checkpoints" / NEWEST)
    if reference:
        assert reference.keys() == exported.keys()
        for key, tensor in reference.items():
            assert exported[key].dtype == torch.float32 and torch.equal(exported[key], tensor), key
    else:  # stage 0 with bf16: every master rounds to the bf16 weight, and carries more than bf16 precision
        module = torch.load(run_dir / "checkpoints" / NEWEST / "mp_rank_00_model_states.pt", weights_only=False)
        for key, tensor in exported.items():
            assert torch.equal(tensor.to(torch.bfloat16), module["module"][key]), key
        assert any(not torch.equal(t, t.to(torch.bfloat16).float()) for t in exported.values())

    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert (len(files) > 1) == sharded and (out / "model.safetensors.index.json").is_file() == sharded
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] == cfg.tie_embeddings
    assert config["eos_token_id"] == 256 and config["pad_token_id"] == 257
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    head, embed = hf.get_output_embeddings().weight, hf.get_input_embeddings().weight
    if cfg.tie_embeddings:
        assert head is embed
    else:  # the trained head is kept, never replaced by the embedding
        assert torch.equal(head, exported["lm_head.weight"]) and not torch.equal(head, embed)
    if cfg.position == "rope":
        assert type(hf).__name__ == "LlamaForCausalLM"
        assert (config["num_key_value_heads"], config["head_dim"]) == (cfg.kv_heads, cfg.head_dim)
        assert config["attention_bias"] == config["mlp_bias"] == cfg.bias
        assert (config["intermediate_size"], config["rms_norm_eps"]) == (cfg.d_ff, cfg.norm_eps)
        assert config["max_position_embeddings"] == cfg.max_seq_len
    else:
        assert type(hf).__name__ == "GPT2LMHeadModel"
        assert (config["n_inner"], config["activation_function"]) == (cfg.d_ff, "gelu_new")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tokenizer("héllo", add_special_tokens=False)["input_ids"] == list("héllo".encode())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero1-llama-gqa-untied", "zero3-gpt2-tied"])
def test_universal_checkpoint_exports_the_same_weights(
    name: str, trained: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bigtx.checkpoint import to_universal

    run_dir = trained(name)
    to_universal(run_dir / "checkpoints" / NEWEST)
    out = tmp_path / "st"
    code, stdout, stderr = run_cli(
        ["export", "safetensors", str(run_dir), "--tag", f"universal/{NEWEST}", "--out", str(out)], capsys
    )
    assert code == 0, stderr
    assert "universal checkpoint" in stdout
    reference = masters(run_dir / "checkpoints" / NEWEST)
    exported = open_source(out).state_dict()
    assert exported.keys() == reference.keys()
    for key, tensor in reference.items():
        assert torch.equal(exported[key], tensor), key


@pytest.mark.slow
def test_tags_and_unusable_checkpoints_are_user_errors(
    trained: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = shutil.copytree(trained("zero2-llama-tied-bias"), tmp_path / "run")
    older = open_source(run_dir, "2").state_dict()
    assert open_source(run_dir, OLDER).path.name == OLDER
    assert not torch.equal(older["embed.weight"], open_source(run_dir).state_dict()["embed.weight"])

    # no traceback, exit code 2, the message says what exists
    res = subprocess.run(
        [sys.executable, "-m", "bigtx", "export", "hf", str(run_dir), "--tag", "step_00000099", "--out", "x"],
        capture_output=True, text=True, env=base_env(), cwd=REPO,
    )  # fmt: skip
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"no checkpoint {run_dir / 'checkpoints' / 'step_00000099'}" in res.stderr
    assert f"complete checkpoints (choose with --tag): {NEWEST}, {OLDER}" in res.stderr

    out = ["--out", str(tmp_path / "out")]
    (run_dir / "checkpoints" / NEWEST / "COMPLETE.json").unlink()
    code, _, err = run_cli(["export", "hf", str(run_dir), *out], capsys)
    assert code == 2 and "incomplete checkpoint (no COMPLETE.json)" in err
    shard = next((run_dir / "checkpoints" / OLDER).glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:1000])
    code, _, err = run_cli(["export", "safetensors", str(run_dir), "--tag", OLDER, *out], capsys)
    assert code == 2 and "truncated" in err and OLDER in err
    code, _, err = run_cli(["generate", str(run_dir / "checkpoints" / OLDER), "--prompt", "x"], capsys)
    assert code == 2 and "truncated" in err
    code, _, err = run_cli(["export", "hf", str(tmp_path), *out], capsys)
    assert code == 2 and "not a bigtx run directory" in err
    assert not (tmp_path / "out").exists()  # nothing half-written


@pytest.mark.slow
def test_safetensors_export_feeds_init_from_and_generate(
    trained: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], byte_shards: Path
) -> None:
    run_dir = trained("zero1-llama-gqa-untied")
    out = tmp_path / "weights"
    code, stdout, _ = run_cli(
        ["export", "safetensors", str(run_dir), "--out", str(out), "--max-shard-size", "100KB"], capsys
    )
    assert code == 0 and f"model.init_from={out.resolve()}" in stdout
    source = open_source(run_dir)
    model = Transformer(source.spec.model)
    load_weights(model, out)
    for key, tensor in masters(run_dir / "checkpoints" / NEWEST).items():
        assert torch.equal(model.state_dict()[key], tensor), key

    # the same greedy continuation from the checkpoint, the weights directory and a HF export
    code, _, _ = run_cli(["export", "hf", str(out), "--out", str(tmp_path / "hf")], capsys)
    assert code == 0
    texts = []
    for model_path in (run_dir, out, tmp_path / "hf"):
        argv = ["generate", str(model_path), "--prompt", "def main(", "--greedy", "--max-new-tokens", "24"]
        code, stdout, stderr = run_cli(argv, capsys)
        assert code == 0, stderr
        assert stdout.startswith("def main(") and "new tokens in" in stderr
        texts.append(stdout)
    assert texts[0] == texts[1] == texts[2]

    # continued pretraining starts from the exported weights
    spec_overrides = tiny_overrides(
        tmp_path / "continued", byte_shards, "train.max_steps=2", "checkpoint.every_steps=0"
    )
    train(str(out / "spec.yaml"), spec_overrides, 1, tmp_path / "logs")
    assert f"initialised weights from {out.resolve()}" in (tmp_path / "continued" / "train.log").read_text()


# --------------------------------------------------------------------------------------------
# No DeepSpeed needed: import, refusals, tokenizers, memory.


def hf_dir(tmp_path: Path, kind: str) -> Path:
    """A random Hugging Face model saved with safetensors and the byte tokenizer."""
    transformers = pytest.importorskip("transformers")
    from bigtx.export.hf import byte_tokenizer, write_tokenizer_files

    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(
            vocab_size=320, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=50000.0,
            attention_bias=True, mlp_bias=True, tie_word_embeddings=False, eos_token_id=256, pad_token_id=257,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(
            vocab_size=320,
            n_positions=128,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_inner=256,
            eos_token_id=256,
            bos_token_id=256,
        )
        model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():  # norms and biases away from their init, so no mapping error can hide
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path / f"hf-{kind}"
    model.save_pretrained(str(path))
    write_tokenizer_files(byte_tokenizer(), {"eos": 256, "pad": 257}, path, 128)
    return path


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_hf_to_bigtx_to_hf_gives_identical_tensors(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    original = hf_dir(tmp_path, kind)
    code, stdout, stderr = run_cli(["import", "hf", str(original), "--out", str(tmp_path / "bigtx")], capsys)
    assert code == 0, stderr
    spec_text = (tmp_path / "bigtx" / "spec.yaml").read_text()
    assert f"init_from: {(tmp_path / 'bigtx').resolve()}" in spec_text
    code, stdout, stderr = run_cli(
        ["export", "hf", str(tmp_path / "bigtx"), "--out", str(tmp_path / "back"), "--verify"], capsys
    )
    assert code == 0 and "verify: ok" in stdout, stdout + stderr

    before, after = tensor_files(original), tensor_files(tmp_path / "back")
    ignored = (".attn.bias", ".attn.masked_bias")
    assert {k for k in before if not k.endswith(ignored)} == set(after)
    for key in after:
        with safe_open(before[key], framework="pt") as a, safe_open(after[key], framework="pt") as b:
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
    old, new = (json.loads((d / "config.json").read_text()) for d in (original, tmp_path / "back"))
    for field in ("num_key_value_heads", "rope_parameters", "rms_norm_eps", "attention_bias", "mlp_bias",
                  "n_inner", "n_positions", "layer_norm_epsilon", "tie_word_embeddings", "vocab_size"):  # fmt: skip
        assert old.get(field) == new.get(field), field


def test_import_refuses_what_bigtx_cannot_express(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = hf_dir(tmp_path, "llama")
    config = json.loads((path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    config["mlp_bias"] = False
    (path / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(["import", "hf", str(path), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "RoPE scaling 'linear'" in err and "attention_bias=True but mlp_bias=False" in err


def memory_source(cfg: ModelSection, tmp_path: Path, tokenizer: str = "byte") -> WeightSource:
    """A source whose tensors are made on request (what a lazy checkpoint reader does)."""
    spec = validate_spec(
        {"model": cfg.model_dump(), "train": {"max_steps": 1000}, "data": {"seq_len": 64, "tokenizer": tokenizer}}
    )
    shapes = expected_shapes(cfg)

    def read(key: str) -> torch.Tensor:
        gen = torch.Generator().manual_seed(len(key))
        return torch.randn(shapes[key], generator=gen).mul_(0.02)

    return WeightSource(path=tmp_path, spec=spec, kind="generated", shapes=shapes, read=read)


def test_export_refuses_post_norm_naming_the_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = ModelSection(preset="tiny", norm_placement="post")
    export_safetensors(memory_source(cfg, tmp_path), tmp_path / "weights")
    code, _, err = run_cli(["export", "hf", str(tmp_path / "weights"), "--out", str(tmp_path / "hf")], capsys)
    assert code == 2 and "model.norm_placement=post has no Hugging Face equivalent" in err
    assert "bigtx export safetensors" in err and "Traceback" not in err


def test_trained_bpe_tokenizer_ships_with_the_export(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from bigtx.data.tokenizer import load_tokenizer, train_tokenizer
    from bigtx.export import export_hf

    text = "the quick brown fox jumps over the lazy dog. Grüße 🙂\n"
    train_tokenizer([text * 50], 300, str(tmp_path / "tok.json"))
    ours = load_tokenizer(str(tmp_path / "tok.json"))
    export_hf(memory_source(ModelSection(preset="tiny"), tmp_path, str(tmp_path / "tok.json")), tmp_path / "hf")
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert auto(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    assert auto.decode(ours.encode(text)) == text
    assert (auto.eos_token_id, auto.pad_token_id) == (ours.eos_id, ours.pad_id) == (0, 1)
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == 0


def test_load_weights_refuses_another_architecture(tmp_path: Path) -> None:
    cfg = ModelSection(preset="tiny")
    export_safetensors(memory_source(cfg, tmp_path), tmp_path / "weights")
    load_weights(Transformer(cfg), tmp_path / "weights")
    with pytest.raises(ValueError, match="model.n_heads: weights have 4, the model 2"):
        load_weights(Transformer(cfg.model_copy(update={"n_heads": 2, "n_kv_heads": 2})), tmp_path / "weights")
    with pytest.raises(ValueError, match="missing"):
        load_weights(Transformer(ModelSection(preset="tiny", n_layers=3)), tmp_path / "weights")


_MEASURE = """
import json, resource, sys
from pathlib import Path
from tests.integration.test_export import memory_source
from bigtx.config.spec import ModelSection
from bigtx.export import export_hf
import transformers, transformers.models.llama  # imported before the baseline: code is not tensors
tmp, shard = Path(sys.argv[1]), sys.argv[2]
cfg = ModelSection(preset="tiny", vocab_size=32000, d_model=1024, n_layers=6, n_heads=16, n_kv_heads=4, d_ff=2816)
source = memory_source(cfg, tmp)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
export_hf(source, tmp / "hf", dtype="bf16", max_shard_size=shard)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
largest = max(n for n in (s[0] * (s[1] if len(s) > 1 else 1) for s in source.shapes.values()))
print(json.dumps({"added": peak - before, "model_bf16": cfg.num_params() * 2, "largest_fp32": largest * 4}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("shard", ["5GB", "100MB"])
def test_export_peak_memory_is_one_copy_in_the_output_precision(shard: str, tmp_path: Path) -> None:
    """Peak RSS added by a bf16 export of a 130M-parameter model (fresh process, kernel high-water mark)."""
    res = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(tmp_path), shard], capture_output=True, text=True, env=base_env(), cwd=REPO
    )
    assert res.returncode == 0, res.stderr
    m = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"{shard}: peak added {m['added'] / 1e6:.0f} MB; model in bf16 {m['model_bf16'] / 1e6:.0f} MB")
    # one shard (the whole model when it fits in one) + the fp32 tensor being converted + slack
    budget = min(m["model_bf16"], 2 * 100e6 if shard == "100MB" else m["model_bf16"]) + m["largest_fp32"] + 64e6
    assert m["added"] <= budget, m


def test_generate_samples_reproducibly_and_refuses_too_long_prompts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    export_safetensors(memory_source(ModelSection(preset="tiny"), tmp_path), tmp_path / "weights")
    argv = ["generate", str(tmp_path / "weights"), "--prompt", "abc", "--max-new-tokens", "16", "--seed", "3"]
    argv += ["--temperature", "0.8", "--top-k", "20", "--top-p", "0.9"]
    first, second = run_cli(argv, capsys), run_cli(argv, capsys)
    assert first[0] == 0 and first[1] == second[1] and first[1].startswith("abc")
    code, _, err = run_cli(
        ["generate", str(tmp_path / "weights"), "--prompt", "x" * 250, "--max-new-tokens", "9"], capsys
    )
    assert code == 2 and "exceeds model.max_seq_len=256" in err


# --------------------------------------------------------------------------------------------
# --out and --overwrite: an export replaces only an earlier export (no training needed).


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes), directory (None) and link (its target) under ``root``."""
    out: dict[str, bytes | None] = {}
    for p in sorted(root.rglob("*")):
        key = str(p.relative_to(root))
        out[key] = str(p.readlink()).encode() if p.is_symlink() else p.read_bytes() if p.is_file() else None
    return out


def fake_run(path: Path) -> Path:
    """What a bigtx run directory holds, as far as the export's refusals are concerned."""
    ckpt = path / "checkpoints" / "step_00000002"
    ckpt.mkdir(parents=True)
    (ckpt / "COMPLETE.json").write_text('{"step": 2, "files": {}}')
    (ckpt / "bigtx_meta.json").write_text("{}")
    (ckpt / "mp_rank_00_model_states.pt").write_bytes(b"\x00weights")
    (path / "checkpoints" / "newest").write_text("step_00000002\n")
    (path / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    (path / "spec.yaml").write_text("run: {}\n")
    (path / "tb").mkdir()
    (path / "tb" / "events.out.tfevents.1").write_bytes(b"tb")
    return path


@pytest.mark.parametrize("command", ["export hf", "export safetensors", "import hf"])
def test_out_that_is_not_an_earlier_export_is_refused_and_left_untouched(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = fake_run(tmp_path / "run")
    if command == "import hf":
        source = hf_dir(run, "llama")  # run/hf-llama
    else:
        source = run / "weights"
        export_safetensors(memory_source(ModelSection(preset="tiny"), tmp_path), source)
    other_run = fake_run(tmp_path / "other-run")
    data = tmp_path / "data"
    data.mkdir()
    (data / "index.json").write_text('{"format": "bigtx-shards"}')
    (data / "train-000000.tar").write_bytes(b"shard")
    (tmp_path / "file").write_text("a file")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not an export")
    (tmp_path / "link").symlink_to(source)
    forged = tmp_path / "forged"
    forged.mkdir()
    (forged / MARKER).write_text('{"format": "something-else", "files": []}')
    (forged / "model.safetensors").write_bytes(b"x")
    grown = tmp_path / "grown"  # an earlier export that someone has since added files to
    export_safetensors(memory_source(ModelSection(preset="tiny"), tmp_path), grown)
    (grown / "notes.txt").write_text("added later")
    (grown / "checkpoints").mkdir()
    monkeypatch.chdir(run)
    cases = {
        str(source): "is the source",
        str(tmp_path / "link"): "is the source",  # a symlink to it
        f"../{run.name}/./{source.name}": "is the source",  # a relative path to it
        str(run): "contains the source",  # the run directory that holds it
        str(tmp_path): "contains the source",
        str(run / "checkpoints" / "step_00000002" / "hf"): "is inside the checkpoint",
        str(other_run): "not written by bigtx export (no .bigtx-export.json); it looks like a bigtx run directory",
        str(data): "it looks like a `bigtx data build` directory (it holds index.json)",
        str(tmp_path / "file"): "is a file, not a directory",
        str(tmp_path / "mine"): "was not written by bigtx export",
        str(forged): "was not written by bigtx export",
        str(grown): "holds files bigtx export did not write (checkpoints, notes.txt)",
    }
    before = snapshot(tmp_path)
    capsys.readouterr()
    for out, message in cases.items():
        for overwrite in ([], ["--overwrite"]):
            code, _, err = run_cli([*command.split(), str(source), "--out", out, *overwrite], capsys)
            assert code == 2 and err.startswith(f"bigtx: error: --out {Path(out)}: "), (out, err)
            assert message in err, (out, err)
    assert snapshot(tmp_path) == before  # nothing deleted, changed or left half-written


def test_overwrite_replaces_an_earlier_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = tmp_path / "weights"
    export_safetensors(memory_source(ModelSection(preset="tiny"), tmp_path), weights)
    out = tmp_path / "out"
    out.mkdir()  # an empty directory is fine without --overwrite
    code, _, err = run_cli(["export", "safetensors", str(weights), "--out", str(out), "--dtype", "bf16"], capsys)
    assert code == 0, err
    marker = json.loads((out / MARKER).read_text())
    assert (marker["format"], marker["kind"], marker["source"]) == ("bigtx-export", "safetensors", str(weights))
    assert marker["files"] == ["model.safetensors", "spec.yaml"] and marker["written_by"].startswith("bigtx ")
    assert (out / MARKER).stat().st_mode & 0o777 == 0o644

    code, _, err = run_cli(["export", "hf", str(weights), "--out", str(out)], capsys)
    assert code == 2 and "holds an earlier export (safetensors of" in err and "pass --overwrite" in err
    assert json.loads((out / MARKER).read_text()) == marker
    for _ in range(2):  # an hf export replaces the safetensors one, then an earlier hf export
        code, _, err = run_cli(["export", "hf", str(weights), "--out", str(out), "--overwrite"], capsys)
        assert code == 0, err
        marker = json.loads((out / MARKER).read_text())
        assert marker["kind"] == "hf" and "config.json" in marker["files"] and "spec.yaml" not in marker["files"]
        assert sorted(p.name for p in out.iterdir()) == sorted([*marker["files"], MARKER])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "weights"]  # no temporary directories left


# --------------------------------------------------------------------------------------------
# Universal checkpoints are read with weights_only=True.


class _OpensAFile:
    """Unpickling this calls open(path, "w"): a stand-in for any code a pickle can run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (str(self.path), "w"))


def fake_universal(path: Path, cfg: ModelSection) -> dict[str, torch.Tensor]:
    """A universal checkpoint as `bigtx ckpt universal` writes it: zero/<name>/fp32.pt per tensor."""
    spec = validate_spec({"model": cfg.model_dump(), "train": {"max_steps": 1000}, "data": {"tokenizer": "byte"}})
    tensors = {k: torch.randn(shape) for k, shape in expected_shapes(cfg).items()}
    for key, tensor in tensors.items():
        (path / "zero" / key).mkdir(parents=True)
        torch.save({"param": tensor, "cat_dim": 0}, path / "zero" / key / "fp32.pt")
    (path / "bigtx_meta.json").write_text(json.dumps({"step": 4, "zero_stage": 1, "spec": spec_to_dict(spec)}))
    (path / "COMPLETE.json").write_text('{"step": 4, "files": {}}')
    return tensors


def test_universal_checkpoint_with_pickled_objects_is_refused_without_running_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "step_00000004"
    tensors = fake_universal(ckpt, ModelSection(preset="tiny"))
    code, stdout, err = run_cli(["export", "safetensors", str(ckpt), "--out", str(tmp_path / "good")], capsys)
    assert code == 0 and "universal checkpoint" in stdout, err
    exported = open_source(tmp_path / "good").state_dict()
    assert all(torch.equal(exported[k], t) for k, t in tensors.items())

    flag = tmp_path / "code-ran"
    target = ckpt / "zero" / "embed.weight" / "fp32.pt"
    torch.save({"param": _OpensAFile(flag), "cat_dim": 0}, target)
    torch.load(target, weights_only=False)["param"].close()  # the payload is live: a full unpickle runs it
    assert flag.exists()
    flag.unlink()
    hostile = {
        "holds pickled Python objects, not only tensors (Unsupported global: GLOBAL io.open)": None,
        "expected a tensor or a dict with a 'param' tensor, found list": [1, 2],
        "expected a tensor or a dict with a 'param' tensor, found dict with keys ['cat_dim', 'weights']": {
            "weights": torch.zeros(3),
            "cat_dim": 0,
        },
        "cannot be read": b"truncated",
    }
    for message, content in hostile.items():
        if isinstance(content, bytes):
            target.write_bytes(content)
        elif content is not None:
            torch.save(content, target)
        code, _, err = run_cli(["export", "hf", str(ckpt), "--out", str(tmp_path / "out")], capsys)
        assert code == 2 and f"{target}: {message}" in err, err
        assert "Traceback" not in err and not (tmp_path / "out").exists()
        assert not flag.exists()

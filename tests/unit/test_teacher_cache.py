"""bigtx.teacher_cache and `bigtx distill cache`: built from the training stream, read by position,
refused when it does not fit the run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from bigtx import train
from bigtx.cli.main import main as cli
from bigtx.config import SpecError, load_spec
from bigtx.data import build_loader
from bigtx.distill import open_teacher
from bigtx.distributed import DistEnv
from bigtx.export import open_model
from bigtx.model.distill_loss import TeacherTopK, distill_loss
from bigtx.teacher_cache import MANIFEST, CachedTeacher, CacheError, build_cache, check_cache
from tests.unit.test_distill import TEACHER, export_teacher, reference

STEPS = 3  # tiny: 4 rows per micro-batch, so 12 rows per slot


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_teacher(reference(TEACHER), tmp_path_factory.mktemp("teacher"))


def spec_for(teacher: Path, shards: Path | str, *extra: str):  # type: ignore[no-untyped-def]
    overrides = [f"data.train={shards}", "precision=fp32", f"train.max_steps={STEPS}", "schedule.warmup_steps=1"]
    overrides.append(f"distill.teacher={teacher}")
    return load_spec("tiny", [*overrides, "distill.top_k=8", *extra])


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory, teacher: Path, byte_shards: Path) -> Path:
    """A cache for 2 slots, its 12 rows per slot in shards cut after 2 builder batches of 5 rows."""
    out = tmp_path_factory.mktemp("cache") / "cache"
    manifest = build_cache(spec_for(teacher, byte_shards), out, 2, batch_rows=5, shard_bytes=20_000, say=lambda _: None)
    assert manifest["rows_per_slot"] == 12 and manifest["tokens"] == 2 * 12 * 64
    assert [[(s["first_row"], s["rows"]) for s in shards] for shards in manifest["slot_shards"]] == [
        [(0, 10), (10, 2)]
    ] * 2
    return out


def cached_spec(teacher: Path, shards: Path | str, cache: Path, *extra: str):  # type: ignore[no-untyped-def]
    return spec_for(teacher, shards, f"distill.source={cache}", *extra)


def test_cached_top_k_gives_the_online_top_k_loss_and_gradient() -> None:
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(40, 50, generator=gen, requires_grad=True)
    logits = 3 * torch.randn(40, 50, generator=gen)
    targets = torch.randint(0, 50, (40,), generator=gen)
    targets[5] = -100
    logp = torch.log_softmax(logits, dim=-1)
    ids = logits.topk(12, dim=-1).indices
    top = TeacherTopK(logp.gather(1, ids), ids, logp.gather(1, targets.clamp_min(0)[:, None]).squeeze(1))
    for kind in ("forward_kl", "reverse_kl"):
        options = dict(alpha=0.7, temperature=2.0, kind=kind, top_k=8)
        online = distill_loss(student, logits, targets, **options)  # type: ignore[arg-type]
        cached = distill_loss(student, top, targets, **options)  # type: ignore[arg-type]
        for a, b in zip(online, cached):
            assert a.item() == pytest.approx(b.item(), rel=1e-6, abs=1e-7)
        (g_online,) = torch.autograd.grad(online.total, student)
        (g_cached,) = torch.autograd.grad(cached.total, student)
        torch.testing.assert_close(g_cached, g_online, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match=r"top_k must be in \[1, K=12\] with a teacher given by its top-12, got 0"):
        distill_loss(student, top, targets, alpha=0.5, top_k=0)
    with pytest.raises(ValueError, match="expected teacher top-k"):
        distill_loss(student, TeacherTopK(top.logprobs[:3], top.ids, top.target_logprob), targets, alpha=0.5, top_k=8)


def test_cache_rows_are_the_teachers_top_k_of_each_slots_stream(cache: Path, teacher: Path, byte_shards: Path) -> None:
    spec = cached_spec(teacher, byte_shards, cache)
    manifest = check_cache(spec, 2)
    reader = CachedTeacher(str(cache), manifest, torch.device("cpu"))
    model = open_model(open_teacher(str(teacher), spec.data, 320), torch.float32)
    for slot in range(2):
        loader = build_loader(
            spec.data, seq_len=64, micro_batch_size=4, rank=slot, world_size=2, seed=1234, vocab_size=320
        )
        for step, (x, y) in zip(range(STEPS), loader):
            assert loader.last_rows() == (slot, 4 * step)
            # the micro-batch at rows 8..11 spans both shards of the slot
            top = reader.outputs(x, y, loader.last_rows())
            with torch.no_grad():
                logits = model(x).flatten(0, 1)
            logp = torch.log_softmax(logits, dim=-1)
            assert torch.equal(top.ids, logits.topk(8, dim=-1).indices)
            torch.testing.assert_close(top.logprobs, logp.gather(1, top.ids), rtol=1e-3, atol=2e-3)
            target = logp.gather(1, y.flatten()[:, None]).squeeze(1)
            torch.testing.assert_close(top.target_logprob, target, rtol=1e-3, atol=2e-3)
        loader.close()


def test_one_rank_with_two_workers_reads_the_rows_of_two_ranks(cache: Path, teacher: Path, byte_shards: Path) -> None:
    spec = cached_spec(teacher, byte_shards, cache, "data.num_workers=2")
    reader = CachedTeacher(str(cache), check_cache(spec, 1), torch.device("cpu"))
    loader = build_loader(spec.data, seq_len=64, micro_batch_size=4, rank=0, world_size=1, seed=1234, vocab_size=320)
    positions = []
    for _, (x, y) in zip(range(2 * STEPS), loader):
        positions.append(loader.last_rows())
        reader.outputs(x, y, loader.last_rows())  # every row's hash checked
    loader.close()
    assert positions == [(0, 0), (1, 0), (0, 4), (1, 4), (0, 8), (1, 8)]
    # a restored loader goes on counting where the saved one was
    resumed = build_loader(spec.data, seq_len=64, micro_batch_size=4, rank=0, world_size=1, seed=1234, vocab_size=320)
    loader = build_loader(spec.data, seq_len=64, micro_batch_size=4, rank=0, world_size=1, seed=1234, vocab_size=320)
    for _ in zip(range(3), loader):
        pass
    resumed.load_state_dict(loader.state_dict())
    loader.close()
    x, y = next(iter(resumed))
    assert resumed.last_rows() == (1, 4)
    reader.outputs(x, y, resumed.last_rows())
    resumed.close()


def test_rows_of_another_position_or_a_damaged_shard_are_refused(
    cache: Path, teacher: Path, byte_shards: Path, tmp_path: Path
) -> None:
    spec = cached_spec(teacher, byte_shards, cache)
    reader = CachedTeacher(str(cache), check_cache(spec, 2), torch.device("cpu"))
    loader = build_loader(spec.data, seq_len=64, micro_batch_size=4, rank=0, world_size=2, seed=1234, vocab_size=320)
    x, y = next(iter(loader))
    loader.close()
    with pytest.raises(CacheError) as info:
        reader.outputs(x, y, (1, 0))
    assert str(info.value) == (
        f"distill.source: the teacher cache {cache}: slot 1 row 0 was computed on other tokens than this run trains "
        "on there (the data, its order or the loader state differ from the cache's); rebuild the cache with "
        "`bigtx distill cache` for this run"
    )
    with pytest.raises(CacheError, match=r"holds 12 rows per slot; this run needs row 12 of slot 0"):
        reader.outputs(x, y, (0, 12))
    damaged = tmp_path / "damaged"
    shutil.copytree(cache, damaged)
    shard = damaged / "slot00000-000000.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    reader = CachedTeacher(str(damaged), json.loads((damaged / MANIFEST).read_text()), torch.device("cpu"))
    with pytest.raises(CacheError) as info:
        reader.outputs(x, y, (0, 0))
    assert str(info.value) == (
        f"distill.source: the teacher cache {damaged}: shard {shard} is damaged: its sha256 is not the one "
        "manifest.json records; rebuild the cache"
    )


def problems(spec, world_size: int = 2) -> list[str]:  # type: ignore[no-untyped-def]
    with pytest.raises(SpecError) as info:
        check_cache(spec, world_size)
    return info.value.errors


def test_a_cache_that_does_not_fit_the_run_is_refused_before_training(
    cache: Path, teacher: Path, byte_shards: Path, tmp_path: Path
) -> None:
    where = f"distill.source: the teacher cache {cache}"
    rebuild = "rebuild it with `bigtx distill cache` for this spec"
    assert problems(cached_spec(teacher, byte_shards, cache, "distill.top_k=9", "train.max_steps=4")) == [
        f"{where} holds the teacher's top 8 tokens per position; set distill.top_k to 1 .. 8 (not 9: 0 means the "
        "full vocabulary, which only `online` has)",
        f"{where} holds 12 rows per slot, this run reads 16 (train.max_steps or the batch size grew); {rebuild}",
    ]
    assert problems(cached_spec(teacher, byte_shards, cache, "data.seq_len=32", "run.seed=1")) == [
        f"{where} was built for another data.seq_len (64 there, 32 here); {rebuild}",
        f"{where} was built for another run.seed (1234 there, 1 here); {rebuild}",
    ]
    # a teacher that saw whole rows cannot stand in for one that sees each document alone
    assert problems(cached_spec(teacher, byte_shards, cache, "data.document_mask=true")) == [
        f"{where} was built for another data.document_mask (False there, True here); {rebuild}"
    ]
    assert problems(cached_spec(teacher, byte_shards, cache), world_size=4) == [
        f"{where} was built for 2 data slots (world size x readers per rank), this run has 4 x 1 = 4; use a "
        "layout with 2 slots or rebuild it with --world-size"
    ]
    # other data: the same shards but one
    fewer = tmp_path / "fewer"
    shutil.copytree(byte_shards, fewer)
    index = json.loads((fewer / "index.json").read_text())
    index["splits"]["train"]["shards"].pop()
    (fewer / "index.json").write_text(json.dumps(index))
    (message,) = problems(cached_spec(teacher, fewer, cache))
    assert message == (
        f"{where} was built for another data.train (shard names, sha256 or weights) ([{str(byte_shards)!r}] there, "
        f"[{str(fewer)!r}] here); {rebuild}"
    )
    other = export_teacher(reference(TEACHER.model_copy(update={"n_layers": 2})), tmp_path / "other")
    (message,) = problems(spec_for(other, byte_shards, f"distill.source={cache}"))
    assert message.startswith(
        f"{where} was computed by the teacher {teacher.resolve()}, not by distill.teacher {other}"
    )
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    assert problems(cached_spec(teacher, byte_shards, unfinished)) == [
        f"distill.source: the teacher cache {unfinished} has no manifest.json: build one with `bigtx distill cache` "
        "(an unfinished build has none)"
    ]
    # the trainer's preflight asks the same, before any process group
    env = DistEnv(0, 4, 0, 4, "127.0.0.1", 0, "single")
    with pytest.raises(SpecError, match="was built for 2 data slots"):
        train.preflight(cached_spec(teacher, byte_shards, cache), env)


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        cli(["distill", "cache", "tiny", *args])
    return int(info.value.code or 0), capsys.readouterr().err


def test_cache_command_bad_input(
    capsys: pytest.CaptureFixture[str], teacher: Path, byte_shards: Path, tmp_path: Path
) -> None:
    out = ["--out", str(tmp_path / "new")]
    data = ["--data", str(byte_shards)]
    code, err = run_cli(capsys, *data, *out)
    assert code == 2 and "distill.teacher: required field is missing: give --teacher DIR" in err
    code, err = run_cli(capsys, *data, *out, "--teacher", str(tmp_path / "nowhere"))
    assert code == 2 and f"teacher: no directory '{tmp_path / 'nowhere'}'" in err
    code, err = run_cli(capsys, "--data", str(tmp_path / "nodata"), "--teacher", str(teacher), "--top-k", "4", *out)
    assert code == 2 and "data.train" in err and str(tmp_path / "nodata") in err
    for k in ("0", "321"):
        code, err = run_cli(capsys, *data, "--teacher", str(teacher), "--top-k", k, *out)
        assert code == 2 and (
            f"distill.top_k: a cache keeps the teacher's top 1 .. 320 (model.vocab_size) tokens per position, not {k}; "
            "give --top-k K" in err
        ), err
    code, err = run_cli(capsys, *data, "--teacher", str(teacher), "--top-k", "4", "--out", str(tmp_path))
    assert code == 2 and f"--out {tmp_path} already exists; remove it or choose another directory" in err
    code, err = run_cli(capsys, *data, "--teacher", str(teacher), "--top-k", "4", *out, "--shard-size", "lots")
    assert code == 2 and "--shard-size: cannot read 'lots' as a size" in err
    assert not (tmp_path / "new").exists()


def test_cache_command_writes_a_cache_the_trainer_accepts(
    capsys: pytest.CaptureFixture[str], teacher: Path, byte_shards: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cache"
    args = ["--data", str(byte_shards), "--teacher", str(teacher), "--top-k", "4", "--out", str(out)]
    assert (
        cli(["distill", "cache", "tiny", "--set", "train.max_steps=1", "--set", "schedule.warmup_steps=0", *args]) == 0
    )
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["slots"] == 1 and summary["rows_per_slot"] == 4 and summary["tokens"] == 256
    # top-4 fp16 log-probs and uint16 ids per token, the target's fp16 log-prob, and the row hashes
    assert 4 * (2 + 2) + 2 <= summary["bytes_per_token"] < 4 * (2 + 2) + 2 + 40
    spec = load_spec(
        "tiny",
        [
            f"data.train={byte_shards}",
            "train.max_steps=1",
            "schedule.warmup_steps=0",
            f"distill.teacher={teacher}",
            "distill.top_k=4",
        ]
        + [f"distill.source={out}"],
    )
    manifest = check_cache(spec, 1)
    assert manifest["top_k"] == 4 and manifest["rows_per_slot"] == 4

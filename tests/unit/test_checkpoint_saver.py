"""The checkpoint writer without a process group: hashing while writing, host snapshots, background
saves and their commit (a stand-in engine plays DeepSpeed's ``save_checkpoint``)."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash

from bigtx.checkpoint import complete_checkpoints, verify
from bigtx.checkpoint.hashed_io import HashingWriter, save_hashed
from bigtx.checkpoint.saver import HostSnapshot, Saver
from bigtx.checkpoint.store import COMPLETE, NEWEST, CheckpointError
from bigtx.config import load_spec, spec_to_dict, validate_spec
from bigtx.train import main as train_main

MODEL_FILE = "mp_rank_00_model_states.pt"


def test_save_hashed_digest_is_the_files(tmp_path: Path) -> None:
    state = {"w": torch.arange(1000, dtype=torch.float32), "step": 3}
    entry = save_hashed(state, tmp_path / "a.pt")
    data = (tmp_path / "a.pt").read_bytes()
    assert entry == {"bytes": len(data), "xxh3_128": xxhash.xxh3_128(data).hexdigest()}
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]  # no temp file left
    loaded = torch.load(tmp_path / "a.pt", weights_only=True)
    assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 3


def test_hashing_writer_counts_bytes_of_any_buffer(tmp_path: Path) -> None:
    with open(tmp_path / "f", "wb") as f:
        writer = HashingWriter(f)
        writer.write(b"abc")
        writer.write(memoryview(torch.arange(4, dtype=torch.int32).numpy()))  # 16 bytes, items of 4
    data = (tmp_path / "f").read_bytes()
    assert writer.digest() == {"bytes": 19, "xxh3_128": xxhash.xxh3_128(data).hexdigest()}


def test_snapshot_copies_and_keeps_storage_sharing(tmp_path: Path) -> None:
    flat = torch.arange(10, dtype=torch.float32)
    param = torch.nn.Parameter(torch.ones(3))
    state = OrderedDict(a=flat[:4], b=flat[4:], p=param, shape=torch.Size([2, 5]), groups=[{"lr": 0.1, "params": [0]}])
    torch.save(state, tmp_path / "live.pt")
    snapshot = HostSnapshot()
    copy = snapshot.take(state)
    flat.add_(100)  # training goes on
    assert torch.equal(copy["a"], torch.arange(4, dtype=torch.float32))
    assert type(copy) is OrderedDict and type(copy["p"]) is torch.nn.Parameter and copy["p"].requires_grad
    assert copy["a"].untyped_storage().data_ptr() == copy["b"].untyped_storage().data_ptr()  # still one storage
    torch.save(copy, tmp_path / "copy.pt")
    assert (tmp_path / "copy.pt").stat().st_size == (tmp_path / "live.pt").stat().st_size
    again = snapshot.take(state)  # the next save reuses the buffers
    assert again["a"].untyped_storage().data_ptr() == copy["a"].untyped_storage().data_ptr()
    assert torch.equal(again["a"], torch.arange(100, 104, dtype=torch.float32))


class StandInEngine:
    """Plays DeepSpeed's ``save_checkpoint``: its files go through ``checkpoint_engine.save``, except
    the recovery script, which it writes itself."""

    def __init__(self, extra: Any = None) -> None:
        self.checkpoint_engine: Any = None
        self.weights = torch.zeros(64)
        self.extra = extra

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool) -> None:
        path = Path(save_dir) / tag
        path.mkdir(parents=True, exist_ok=True)
        self.checkpoint_engine.save({"module": {"w": self.weights}, "extra": self.extra}, str(path / MODEL_FILE))
        (path / "zero_to_fp32.py").write_text("# recovery script\n")


def test_snapshot_reuses_its_buffers_for_new_tensors_of_the_same_sizes() -> None:
    # DeepSpeed's ZeRO-1/2 state dicts hold new tensors at each save: the copies still go into the
    # buffers of the last snapshot (a new buffer would be written page fault by page fault)
    snapshot = HostSnapshot()

    def state(base: float) -> dict:
        return {"m": torch.full((1000,), base), "v": torch.full((1000,), base + 1), "s": torch.full((10,), base)}

    first = snapshot.take(state(1.0))
    buffers = {t.untyped_storage().data_ptr() for t in first.values()}
    second = snapshot.take(state(5.0))  # new tensors, same sizes
    assert {t.untyped_storage().data_ptr() for t in second.values()} == buffers
    assert [float(second[k][0]) for k in ("m", "v", "s")] == [5.0, 6.0, 5.0]
    grown = snapshot.take({"m": torch.full((2000,), 7.0), "s": torch.full((10,), 8.0)})
    assert grown["m"].untyped_storage().data_ptr() not in buffers  # no buffer of that size: a new one
    assert grown["s"].untyped_storage().data_ptr() == second["s"].untyped_storage().data_ptr()
    assert float(grown["m"][0]) == 7.0 and float(grown["s"][0]) == 8.0


def saver(engine: StandInEngine, root: Path, background: bool) -> Saver:
    return Saver(engine, root, background=background, keep_last=2, keep_every=0, commit_timeout_s=5)


@pytest.mark.parametrize("background", [False, True])
def test_save_commits_every_file_hashed(tmp_path: Path, background: bool) -> None:
    engine = StandInEngine()
    s = saver(engine, tmp_path, background)
    for step in (10, 20, 30):
        s.save(step, {"rank": 0}, {"step": step})
    s.wait()
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000030", "step_00000020"]  # keep_last 2
    path = tmp_path / "step_00000030"
    files = json.loads((path / COMPLETE).read_text())["files"]
    assert sorted(files) == ["bigtx_meta.json", "bigtx_rank00000.pt", MODEL_FILE, "zero_to_fp32.py"]
    assert verify(path) == []
    assert not (path / "digests").exists()
    assert (tmp_path / NEWEST).read_text() == "step_00000030\n"


def test_background_save_writes_the_state_of_its_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bigtx.checkpoint.saver as saver_module

    go = threading.Event()
    real = saver_module.save_hashed

    def held(obj: Any, path: Path) -> dict[str, Any]:
        go.wait(10)
        return real(obj, path)

    monkeypatch.setattr(saver_module, "save_hashed", held)
    engine = StandInEngine()
    s = saver(engine, tmp_path, background=True)
    path = s.save(10, {"rank": 0}, {"step": 10})
    engine.weights.add_(1)  # the next step, while the save is still being written
    assert not (path / COMPLETE).exists()
    go.set()
    s.wait()
    assert torch.equal(torch.load(path / MODEL_FILE, weights_only=True)["module"]["w"], torch.zeros(64))


def test_failed_background_save_is_raised_and_never_committed(tmp_path: Path) -> None:
    engine = StandInEngine(extra=lambda: None)  # cannot be pickled
    s = saver(engine, tmp_path, background=True)
    path = s.save(10, {"rank": 0}, {"step": 10})
    with pytest.raises(CheckpointError, match=f"background save of {path} failed: .*lambda"):
        s.wait()
    assert not (path / COMPLETE).exists() and not (tmp_path / NEWEST).exists()
    s.wait()  # reported once


def test_async_is_spelled_async_in_specs() -> None:
    spec = load_spec("tiny", ["checkpoint.async=true"])
    assert spec.checkpoint.async_ is True
    saved = spec_to_dict(spec)["checkpoint"]
    assert saved["async"] is True and "async_" not in saved  # spec.yaml reads back as written
    assert validate_spec(spec_to_dict(spec)).checkpoint.async_ is True


@pytest.mark.parametrize(
    ("override", "error"),
    [
        ("checkpoint.async=maybe", "checkpoint.async: Input should be a valid boolean"),
        ("checkpoint.async_=true", "checkpoint.async_: unknown field"),
    ],
)
def test_bad_async_names_the_field(override: str, error: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert train_main(["tiny", f"--set={override}"]) == 2
    assert error in capsys.readouterr().err

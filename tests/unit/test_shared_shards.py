"""Fewer train shards than readers: readers share a shard, each taking every k-th document of it.

Exactly once per epoch, deterministic, exactly resumable mid-shard; and refused before training (with
the counts and the fix) when a shard has fewer documents than the readers sharing it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from bigtx.config.spec import DataSection
from bigtx.data import DataError, build_loader, check_data
from bigtx.data.build import build_shards
from bigtx.data.stream import doc_share
from tests.unit.test_loader import EOS, assert_same, doc_ids, make_loader, roundtrip, shard_doc_ids, take, write_corpus

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", params=[1, 3], ids=["1-shard", "3-shards"])
def few(request, tmp_path_factory):
    """A built directory with 1 or 3 train shards, 46 documents in all."""
    root = tmp_path_factory.mktemp(f"few{request.param}")
    write_corpus(root / "in", 60, seed=5)
    out = str(root / "ds")
    size = {1: 64 * 10**6, 3: 40_000}[request.param]
    index = build_shards([str(root / "in")], "byte", out, shard_size=size, val_fraction=0.2, progress=False)
    assert len(index["splits"]["train"]["shards"]) == request.param
    return out, index


def test_doc_share_rule():
    # 3 shards, 4 readers: slots 0 and 3 split shard position 0, slots 1 and 2 read theirs whole
    assert [doc_share(3, slot=s, n_slots=4, train=True) for s in range(4)] == [(0, 2), (0, 1), (0, 1), (1, 2)]
    assert [doc_share(1, slot=s, n_slots=3, train=True) for s in range(3)] == [(0, 3), (1, 3), (2, 3)]
    assert doc_share(4, slot=3, n_slots=4, train=True) == doc_share(1, slot=0, n_slots=3, train=False) == (0, 1)


def reader_needs(loader, samples: dict[str, int], epoch: int) -> list[int]:
    """Documents each reader of this rank reads in ``epoch``, by the documented rule (not by the loader)."""
    cfg = loader.cfg
    n = len(cfg.sources[0].shards)
    needs = []
    for w in range(cfg.readers):
        slot = cfg.rank * cfg.readers + w
        (url,) = loader.shards_for(epoch, w)[0]
        k, j = len(range(slot % n, cfg.n_slots, n)), slot // n
        needs.append(len(range(j, samples[os.path.basename(url)], k)))
    return needs


@pytest.mark.parametrize("restore_at", [None, 7])
@pytest.mark.parametrize(("ws", "nw"), [(4, 0), (2, 2), (5, 0)])  # 4, 4 and 5 readers
def test_every_document_exactly_once_in_each_of_two_epochs(few, ws, nw, restore_at):
    out, index = few
    train = index["splits"]["train"]
    samples = {s["name"]: s["samples"] for s in train["shards"]}
    seen: list[list[int]] = [[], []]
    for rank in range(ws):
        loader = make_loader(out, rank=rank, ws=ws, nw=nw)
        needs = [reader_needs(loader, samples, e) for e in (0, 1)]
        total = [a + b for a, b in zip(*needs)]
        readers = loader.cfg.readers
        streams: list[list[np.ndarray]] = [[] for _ in range(readers)]
        eos = [0] * readers
        k, it = 0, iter(loader)
        while any(eos[w] < total[w] for w in range(readers)):
            if k == restore_at:  # mid-shard: every reader is inside its (only) shard
                state = roundtrip(loader.state_dict())
                it.close()
                loader = make_loader(out, rank=rank, ws=ws, nw=nw)
                loader.load_state_dict(state)
                it = iter(loader)
            x, _ = next(it)
            w = k % readers
            streams[w].append(x.reshape(-1).numpy())
            eos[w] += int((x == EOS).sum())
            k += 1
        it.close()
        for w in range(readers):
            ids = doc_ids(np.concatenate(streams[w]))
            seen[0] += ids[: needs[0][w]]
            seen[1] += ids[needs[0][w] : total[w]]
    all_ids = sorted(shard_doc_ids([os.path.join(out, s["name"]) for s in train["shards"]]))
    assert len(set(all_ids)) == len(all_ids) == train["samples"]
    for epoch in (0, 1):
        counts = Counter(seen[epoch])
        assert sorted(counts) == all_ids, f"epoch {epoch}: gaps or strangers"
        assert max(counts.values()) == 1, f"epoch {epoch}: duplicates"


@pytest.mark.parametrize(("ws", "nw"), [(4, 0), (2, 2)])
def test_resume_mid_shard_is_bit_identical(few, ws, nw):
    out, _ = few
    total, cut = 16, 6
    for rank in range(ws):
        reference = take(make_loader(out, rank=rank, ws=ws, nw=nw), total)
        assert_same(reference, take(make_loader(out, rank=rank, ws=ws, nw=nw), total))  # deterministic
        first = make_loader(out, rank=rank, ws=ws, nw=nw)
        head = take(first, cut)
        state = roundtrip(first.state_dict())
        sources = [r["stream"]["sources"][0] for r in state["readers"]]
        # every reader is inside epoch 0 with documents of its shard still to come (read on, or buffered)
        assert all(s["epoch"] == 0 and (s["offset"] > 0 or s["buffer"]) for s in sources), sources
        restored = make_loader(out, rank=rank, ws=ws, nw=nw)
        restored.load_state_dict(state)
        assert_same(reference, head + take(restored, total - cut))


def test_layouts_with_the_same_slots_read_the_same_shares(few):
    """The split depends on the slot and the slot count only: 4 ranks x 1 reader == 2 ranks x 2 workers."""
    out, _ = few
    by_rank = [take(make_loader(out, rank=r, ws=4), 3) for r in range(4)]
    for r in range(2):
        by_worker = take(make_loader(out, rank=r, ws=2, nw=2), 6)
        assert_same(by_rank[2 * r], by_worker[0::2])
        assert_same(by_rank[2 * r + 1], by_worker[1::2])


def tiny_dataset(root: Path, n_docs: int) -> str:
    """One train shard of ``n_docs`` documents."""
    os.makedirs(root / "in")
    for i in range(n_docs):
        (root / "in" / f"{i}.txt").write_text(f"document {i} " * 5)
    build_shards([str(root / "in")], "byte", str(root / "ds"), shard_size=10**6, val_fraction=0, progress=False)
    return str(root / "ds")


def test_a_shard_with_fewer_documents_than_its_readers_is_refused_before_training(tmp_path):
    ds = tiny_dataset(tmp_path, 3)
    section = DataSection(train=ds, num_workers=2)
    message = (
        rf"^data.train: {ds}/index.json has 1 train shard\(s\) for 4 readers \(world size 2 x 2 per rank from "
        r"data.num_workers\), so up to 4 readers share a shard, but train-000000.tar holds only 3 document\(s\) "
        r"and every reader needs one: lower data.num_workers"
    )
    with pytest.raises(DataError, match=message):
        check_data(section, 512, world_size=2)
    with pytest.raises(DataError, match=message):
        build_loader(section, seq_len=8, micro_batch_size=1, world_size=2, vocab_size=512)
    check_data(section, 512, world_size=1)  # 2 readers: fine
    check_data(DataSection(train=ds, num_workers=0), 512, world_size=3)


def test_train_refuses_it_in_the_preflight(tmp_path):
    """`bigtx train` as rank 0 of 2 with no rank 1 anywhere: it must stop before any process group."""
    ds = tiny_dataset(tmp_path, 1)
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="1", PYTHONPATH=str(REPO))
    sets = [f"run.dir={tmp_path / 'run'}", f"data.train={ds}"]
    res = subprocess.run(
        [sys.executable, "-m", "bigtx", "train", "tiny", *(a for s in sets for a in ("--set", s))],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2, res.stderr
    assert "1 train shard(s) for 2 readers" in res.stderr and "holds only 1 document(s)" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "run").exists()

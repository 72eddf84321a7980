"""The streaming loader on real shards from the builder: shapes, exact resume, exactly-once epochs,
rank/worker disjointness, validation order, mixtures, shard patterns, pipe: URLs and foreign shards."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import random
import string
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds

from bigtx.config.spec import DataSection, DataSource
from bigtx.data import DataError, build_loader, build_val_loaders
from bigtx.data.build import build_shards
from bigtx.data.shards import ShardSetWriter

EOS = 256  # the byte tokenizer's
SEQ, MB = 16, 2


def write_corpus(root, n_docs: int, seed: int = 0, files: int = 3) -> list[str]:
    """jsonl files of documents "d0007 <random letters>"; returns the texts in order."""
    rng = random.Random(seed)
    texts = [f"d{i:04d} " + "".join(rng.choices(string.ascii_lowercase, k=rng.randint(4, 120))) for i in range(n_docs)]
    os.makedirs(root, exist_ok=True)
    for f in range(files):
        with open(os.path.join(root, f"part{f}.jsonl"), "w") as fh:
            for t in texts[f::files]:
                fh.write(json.dumps({"text": t}) + "\n")
    return texts


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A built directory: ~100 train docs in ~14 shards, ~20 val docs in several shards."""
    root = tmp_path_factory.mktemp("corpus")
    texts = write_corpus(root / "in", 120)
    out = str(root / "ds")
    build_shards([str(root / "in")], "byte", out, shard_size=4096, val_fraction=0.2, progress=False)
    with open(os.path.join(out, "index.json")) as f:
        index = json.load(f)
    return out, index, texts


def make_loader(train, split="train", *, rank=0, ws=1, nw=0, seed=7, mb=MB, seq_len=SEQ, **kw):
    section = DataSection(train=train, num_workers=nw, shuffle_buffer=kw.pop("shuffle_buffer", 8), **kw)
    return build_loader(
        section, split, seq_len=seq_len, micro_batch_size=mb, rank=rank, world_size=ws, seed=seed, vocab_size=512
    )


def take(loader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    it = iter(loader)
    out = [next(it) for _ in range(n)]
    it.close()  # shuts down the workers now
    return out


def roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def doc_ids(stream: np.ndarray) -> list[int]:
    """Ids of the complete documents in a token stream that starts at a document boundary."""
    ends = np.flatnonzero(stream == EOS)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [int(bytes(stream[s:e].astype(np.uint8)).decode()[1:5]) for s, e in zip(starts, ends)]


def inner_doc_ids(row: np.ndarray) -> list[int]:
    """Ids of the documents lying wholly inside a row (between two of its EOS tokens)."""
    ends = np.flatnonzero(row == EOS)
    return doc_ids(row[ends[0] + 1 :]) if len(ends) else []


def shard_doc_ids(urls: list[str]) -> list[int]:
    """Read shards with webdataset itself (independently of bigtx's reader)."""
    ds = wds.WebDataset(urls, shardshuffle=False).decode()
    return [int(bytes(s["ids.npy"][:5].astype(np.uint8)).decode()[1:5]) for s in ds]


def assert_same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_batches_are_shifted_int64(corpus):
    out, _, _ = corpus
    batches = take(make_loader(out), 30)
    for x, y in batches:
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (MB, SEQ)
        assert torch.equal(x[:, 1:], y[:, :-1])
        # bytes and EOS (256) only: nothing is padded, so the byte tokenizer's PAD (257) never appears
        assert int(x.max()) <= 256
    # Rows continue one stream: the target after a row's last input is the next row's first input.
    flat_x = torch.cat([x.reshape(-1) for x, _ in batches])
    flat_y = torch.cat([y.reshape(-1) for _, y in batches])
    assert torch.equal(flat_x[1:], flat_y[:-1])


@pytest.mark.parametrize("nw", [0, 2])
@pytest.mark.parametrize("ws", [1, 2])
def test_resume_is_bit_identical(corpus, nw, ws):
    out, _, _ = corpus
    total, cut = 24, 9
    for rank in range(ws):
        reference = take(make_loader(out, rank=rank, ws=ws, nw=nw), total)
        first = make_loader(out, rank=rank, ws=ws, nw=nw)
        it = iter(first)
        head = [next(it) for _ in range(cut)]
        state = roundtrip(first.state_dict())
        next(it)  # batches fetched after the save do not leak into the state
        it.close()
        restored = make_loader(out, rank=rank, ws=ws, nw=nw)
        restored.load_state_dict(state)
        tail = take(restored, total - cut)
        assert_same(reference, head + tail)
        assert restored.stats()["batches"] == total


@pytest.mark.parametrize("restore_at", [None, 37])
@pytest.mark.parametrize("nw", [0, 2])
@pytest.mark.parametrize("ws", [1, 2])
def test_every_document_exactly_once_per_epoch(corpus, nw, ws, restore_at):
    out, index, _ = corpus
    train = index["splits"]["train"]
    samples = {s["name"]: s["samples"] for s in train["shards"]}
    all_ids = shard_doc_ids([os.path.join(out, s["name"]) for s in train["shards"]])
    assert len(all_ids) == train["samples"] == len(set(all_ids))
    readers = max(1, nw)
    seen: list[int] = []
    for rank in range(ws):
        loader = make_loader(out, rank=rank, ws=ws, nw=nw)
        # documents in each reader's epoch-0 shards (counted from the index, not from the loader)
        need = [sum(samples[os.path.basename(u)] for u in loader.shards_for(0, w)[0]) for w in range(readers)]
        streams: list[list[np.ndarray]] = [[] for _ in range(readers)]
        eos_count = [0] * readers
        k, it = 0, iter(loader)
        while any(eos_count[w] < need[w] for w in range(readers)):
            if k == restore_at:
                state = roundtrip(loader.state_dict())
                it.close()
                loader = make_loader(out, rank=rank, ws=ws, nw=nw)
                loader.load_state_dict(state)
                it = iter(loader)
            x, _ = next(it)
            w = k % readers  # the documented fixed round robin
            streams[w].append(x.reshape(-1).numpy())
            eos_count[w] += int((x == EOS).sum())
            k += 1
        it.close()
        for w in range(readers):
            seen += doc_ids(np.concatenate(streams[w]))[: need[w]]
    counts = Counter(seen)
    assert sorted(counts) == sorted(all_ids), "gaps or strangers"
    assert max(counts.values()) == 1, "duplicates"


def test_epochs_roll_over_reshuffled(corpus):
    out, index, _ = corpus
    n = index["splits"]["train"]["samples"]
    loader = make_loader(out)
    stream = np.concatenate([x.reshape(-1).numpy() for x, _ in take(loader, 600)])
    ids = doc_ids(stream)
    assert len(ids) > 2 * n
    epoch0, epoch1 = ids[:n], ids[n : 2 * n]
    assert sorted(epoch0) == sorted(epoch1) == sorted(set(epoch0))
    assert epoch0 != epoch1
    assert loader.stats()["epoch"] >= 2
    # another seed, another order
    other = doc_ids(np.concatenate([x.reshape(-1).numpy() for x, _ in take(make_loader(out, seed=8), 100)]))
    assert other[:20] != ids[:20]


def test_ranks_and_workers_read_disjoint_shards(corpus):
    out, _, _ = corpus
    loaders = [make_loader(out, rank=r, ws=2, nw=2) for r in range(2)]
    for epoch in range(3):
        plans = [u for ld in loaders for w in range(2) for u in ld.shards_for(epoch, w)[0]]
        assert len(plans) == len(set(plans)) == len(loaders[0].cfg.sources[0].shards)


@pytest.mark.parametrize("nw", [0, 2])
def test_val_is_finite_deterministic_and_disjoint(corpus, nw):
    out, index, texts = corpus
    val = index["splits"]["val"]
    val_ids = shard_doc_ids([os.path.join(out, s["name"]) for s in val["shards"]])
    ids = []
    for rank in range(2):
        loader = make_loader(out, "val", rank=rank, ws=2, nw=nw, mb=1, seq_len=160)
        first = list(loader)
        assert first, "every rank gets validation batches"
        assert_same(first, list(loader))  # iter() restarts from the beginning
        # batches of several readers interleave: use the documents that lie wholly inside one row
        ids.append([i for x, _ in first for i in inner_doc_ids(x[0].numpy())])
    assert ids[0] and ids[1]
    assert not set(ids[0]) & set(ids[1])
    assert set(ids[0]) | set(ids[1]) <= set(val_ids)
    # one rank, no workers: exactly the val documents in index order (minus the dropped tail)
    single = doc_ids(np.concatenate([x.reshape(-1).numpy() for x, _ in make_loader(out, "val", mb=1)]))
    assert single == val_ids[: len(single)] and len(single) >= len(val_ids) - 2


def test_val_with_fewer_shards_than_readers(tmp_path):
    write_corpus(tmp_path / "in", 60, seed=3)
    out = str(tmp_path / "ds")
    build_shards([str(tmp_path / "in")], "byte", out, shard_size=64 * 10**6, val_fraction=0.3, progress=False)
    assert len(make_loader(out, "val").cfg.sources[0].shards) == 1
    ids = []
    for rank in range(2):
        batches = list(make_loader(out, "val", rank=rank, ws=2, mb=1, seq_len=8))
        assert batches
        ids.append(doc_ids(np.concatenate([x.reshape(-1).numpy() for x, _ in batches])))
    assert not set(ids[0]) & set(ids[1])


def test_val_sources(corpus, tmp_path):
    out, _, _ = corpus
    explicit = DataSection(train=out, val=out)
    default = DataSection(train=out)
    a = [x for x, _ in build_loader(explicit, "val", seq_len=SEQ, micro_batch_size=MB, vocab_size=512)]
    b = [x for x, _ in build_loader(default, "val", seq_len=SEQ, micro_batch_size=MB, vocab_size=512)]
    assert len(a) == len(b) > 0 and all(torch.equal(p, q) for p, q in zip(a, b))
    pattern = DataSection(train=os.path.join(out, "train-{000000..000003}.tar"))
    with pytest.raises(DataError, match="data.val: no validation data"):
        build_loader(pattern, "val", seq_len=SEQ, micro_batch_size=MB, vocab_size=512)


def test_named_val_sources_each_read_what_data_val_alone_reads(corpus):
    """Each named source's loader is the val loader of a spec with data.val = its path (on every rank);
    without names there is one loader, the plain val loader."""
    out, _, _ = corpus
    shard = os.path.join(out, "train-{000000..000001}.tar")  # a pattern is read as it is, val or not
    named = DataSection(train=out, val=[{"name": "held-out", "path": out}, {"name": "seen", "path": shard}])
    for rank in range(2):
        kw = dict(seq_len=SEQ, micro_batch_size=MB, rank=rank, world_size=2, vocab_size=512)
        loaders = build_val_loaders(named, **kw)
        assert list(loaders) == ["held-out", "seen"]
        for name, path in (("held-out", out), ("seen", shard)):
            got = [x for x, _ in loaders[name]]
            alone = [x for x, _ in build_loader(DataSection(train=out, val=path), "val", **kw)]
            assert len(got) == len(alone) > 0 and all(torch.equal(p, q) for p, q in zip(got, alone))
        plain = build_val_loaders(DataSection(train=out), **kw)
        assert list(plain) == [None]
        alone = [x for x, _ in build_loader(DataSection(train=out), "val", **kw)]
        assert all(torch.equal(p, q) for p, q in zip([x for x, _ in plain[None]], alone, strict=True))


def test_patterns_globs_and_pipe_urls_read_the_same_data(corpus):
    out, index, _ = corpus
    n = len(index["splits"]["train"]["shards"])
    brace = os.path.join(out, f"train-{{000000..{n - 1:06d}}}.tar")
    reference = take(make_loader(out), 40)
    for spec in (brace, os.path.join(out, "train-*.tar"), f"pipe:cat {brace}", "file://" + brace):
        assert_same(reference, take(make_loader(spec), 40))
    half = n // 2
    joined = (
        os.path.join(out, f"train-{{000000..{half - 1:06d}}}.tar")
        + "::"
        + os.path.join(out, f"train-{{{half:06d}..{n - 1:06d}}}.tar")
    )
    assert_same(reference, take(make_loader(joined), 40))
    assert_same(reference, take(make_loader(os.path.join(out, "index.json")), 40))


def test_shards_written_by_webdataset_shardwriter(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 256, size=rng.integers(5, 60)).astype(np.uint16) for _ in range(40)]
    pattern = str(tmp_path / "wds-%04d.tar")
    with wds.ShardWriter(pattern, maxcount=10) as sink:
        for i, d in enumerate(docs):
            if i % 2:  # raw little-endian bytes, no EOS: the loader appends one
                sink.write({"__key__": f"doc{i}", "ids.u16": d.astype("<u2").tobytes(), "meta.txt": "x"})
            else:  # .npy with its EOS
                sink.write({"__key__": f"doc{i}", "ids.npy": np.append(d, np.uint16(EOS))})
    loader = make_loader(str(tmp_path / "wds-{0000..0003}.tar"), shuffle_buffer=1, mb=1, seq_len=8)
    assert len(loader.cfg.sources[0].shards) == 4
    stream = np.concatenate([x.reshape(-1).numpy() for x, _ in take(loader, 250)])
    pieces = np.split(stream, np.flatnonzero(stream == EOS) + 1)
    got = sorted(tuple(p[:-1].tolist()) for p in pieces[: len(docs)])  # the first epoch
    assert got == sorted(tuple(d.tolist()) for d in docs)


def write_token_shards(directory, name: str, low: int, high: int, n_docs: int, shards: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    per = -(-n_docs // shards)
    for s in range(shards):
        w = ShardSetWriter(str(directory), f"{name}{s}", 1 << 40, np.dtype(np.uint16))
        for i in range(per):
            ids = np.append(rng.integers(low, high, size=int(rng.integers(50, 500))), EOS)
            w.write(f"{s:02d}{i:06d}", ids, "synthetic")
        w.close()
    return os.path.join(str(directory), f"{name}{{0..{shards - 1}}}-000000.tar")


def test_mixture_token_shares_match_weights(tmp_path):
    a = write_token_shards(tmp_path, "a", 0, 100, 800, 4, seed=1)
    b = write_token_shards(tmp_path, "b", 100, 200, 300, 4, seed=2)
    sources = [DataSource(path=a, weight=3.0), DataSource(path=b, weight=1.0)]
    loader = make_loader(sources, mb=8, seq_len=1024)
    batches = take(loader, 123)  # ~1M tokens
    x = torch.cat([x.reshape(-1) for x, _ in batches])
    assert x.numel() > 1_000_000
    share_a = int((x < 100).sum()) / int((x < 200).sum())
    assert abs(share_a - 0.75) < 0.02, share_a
    taken = loader.stats()["source_tokens"]
    assert abs(taken[0] / sum(taken) - 0.75) < 0.01


def test_mixture_resume_is_exact(tmp_path):
    a = write_token_shards(tmp_path, "a", 0, 100, 80, 4, seed=1)
    b = write_token_shards(tmp_path, "b", 100, 200, 40, 4, seed=2)
    sources = [DataSource(path=a, weight=0.6), DataSource(path=b, weight=0.4)]
    reference = take(make_loader(sources, mb=2, seq_len=64), 60)
    first = make_loader(sources, mb=2, seq_len=64)
    head = take(first, 25)
    second = make_loader(sources, mb=2, seq_len=64)
    second.load_state_dict(roundtrip(first.state_dict()))
    assert_same(reference, head + take(second, 35))


def test_layout_change_is_refused_unless_reshuffle_allowed(corpus):
    out, _, _ = corpus
    first = make_loader(out, ws=2, nw=0)
    take(first, 5)
    state = first.state_dict()
    other = make_loader(out, ws=1, nw=2)
    with pytest.raises(DataError, match=r"data.allow_reshuffle: .*world size 2 x data.num_workers=0"):
        other.load_state_dict(state)
    with pytest.raises(DataError, match="belongs to rank 0, not rank 1"):
        make_loader(out, rank=1, ws=2).load_state_dict(state)
    with pytest.raises(DataError, match="seed changed"):
        make_loader(out, ws=2, seed=99).load_state_dict(state)
    allowed = make_loader(out, ws=1, nw=2, allow_reshuffle=True)
    allowed.load_state_dict(state)
    assert len(take(allowed, 5)) == 5
    assert allowed.stats()["batches"] == 10


def test_changed_batch_shape_continues_the_stream(corpus):
    out, _, _ = corpus
    first = make_loader(out)
    head = take(first, 10)
    reference = take(make_loader(out), 30)
    wider = make_loader(out, mb=4)
    wider.load_state_dict(first.state_dict())
    tail = take(wider, 10)
    stream = torch.cat([x.reshape(-1) for x, _ in head + tail])
    expected = torch.cat([x.reshape(-1) for x, _ in reference])[: stream.numel()]
    assert torch.equal(stream, expected)


def test_workers_shut_down(corpus):
    out, _, _ = corpus
    loader = make_loader(out, nw=2)
    it = iter(loader)
    next(it)
    assert len(multiprocessing.active_children()) >= 2
    it.close()
    assert multiprocessing.active_children() == []
    list(make_loader(out, "val", nw=2))
    assert multiprocessing.active_children() == []
    # a new iter() replaces the live one (and its workers) and continues from the last batch delivered
    reference = take(make_loader(out, nw=2), 6)
    loader = make_loader(out, nw=2)
    it = iter(loader)
    head = [next(it) for _ in range(3)]
    tail = take(loader, 3)
    assert_same(reference, head + tail)
    with pytest.raises(StopIteration):
        next(it)
    assert multiprocessing.active_children() == []


def test_state_is_small_and_plain(corpus):
    out, _, _ = corpus
    loader = make_loader(out, nw=2, shuffle_buffer=256)
    take(loader, 20)
    state = loader.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    assert buf.tell() < 64 * 1024
    assert roundtrip(state)["readers"][1]["stream"] == state["readers"][1]["stream"]


@pytest.mark.parametrize(("old", "new"), [((2, 0), (1, 2)), ((1, 2), (2, 0))])
def test_new_world_size_with_the_same_slots_continues_exactly(corpus, old, new):
    """2 ranks x 1 reader -> 1 rank x 2 workers (and back): every slot continues where it stopped."""
    train, _, _ = corpus
    (old_ws, old_nw), (new_ws, new_nw) = old, new
    olds = [make_loader(train, rank=r, ws=old_ws, nw=old_nw) for r in range(old_ws)]
    per_rank = 6 // old_ws  # 6 micro-batches per rank-set: every reader delivers 3
    for loader in olds:
        take(loader, per_rank)
    states = [roundtrip(loader.state_dict()) for loader in olds]
    # what each slot delivers next if nothing had changed
    expected_by_slot = []
    for loader in olds:
        following = take(loader, 2 * loader.cfg.readers)
        readers = loader.cfg.readers
        expected_by_slot += [following[w::readers] for w in range(readers)]
    news = [make_loader(train, rank=r, ws=new_ws, nw=new_nw) for r in range(new_ws)]
    got_by_slot = []
    for loader in news:
        loader.load_resharded_state(states)
        following = take(loader, 2 * loader.cfg.readers)
        got_by_slot += [following[w :: loader.cfg.readers] for w in range(loader.cfg.readers)]
    assert len(got_by_slot) == len(expected_by_slot) == 2
    for got, want in zip(got_by_slot, expected_by_slot):
        assert len(got) == 2
        assert_same(got, want)


def test_new_world_size_with_other_slots_falls_back_to_reshuffle(corpus):
    train, _, _ = corpus
    olds = [make_loader(train, rank=r, ws=2) for r in range(2)]
    for loader in olds:
        take(loader, 3)
    states = [loader.state_dict() for loader in olds]
    with pytest.raises(DataError, match="data.allow_reshuffle"):
        make_loader(train, ws=1).load_resharded_state(states)
    relaxed = make_loader(train, ws=1, allow_reshuffle=True)
    relaxed.load_resharded_state(states)
    assert len(take(relaxed, 2)) == 2

"""``shards.fetch`` over HTTP against a real server on 127.0.0.1: retries with backoff for timeouts,
dropped connections, 5xx and 429; no retry for 401/403/404; messages that name the status and the attempts."""

from __future__ import annotations

import socket
import time

import pytest

from bigtx.config.spec import DataSection
from bigtx.data import DataError, build_loader
from bigtx.data import shards as shards_module
from bigtx.data.shards import CorruptShard, fetch, parse_shard, read_shard
from tests.unit.http_cases import Answer, http_server
from tests.unit.shard_cases import npy, tar_bytes

SHARD = tar_bytes([("a.ids.npy", npy([5, 6, 256])), ("b.ids.npy", npy([7, 256]))])
FAST = dict(timeout=0.3, backoff=0.01)  # the same schedule, scaled down


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """urllib would send requests for 127.0.0.1 to a proxy named in the environment."""
    for var in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)


def test_server_errors_are_retried_until_the_shard_arrives():
    with http_server({"/s.tar": [Answer(503), Answer(503), Answer(200, SHARD)]}) as srv:
        data = parse_shard(fetch(srv.url + "/s.tar", retries=4, **FAST))
        assert srv.count("/s.tar") == 3
    assert [d.tolist() for d in data.docs] == [[5, 6, 256], [7, 256]]


def test_too_many_requests_is_retried():
    with http_server({"/s.tar": [Answer(429), Answer(200, SHARD)]}) as srv:
        assert fetch(srv.url + "/s.tar", retries=1, **FAST) == SHARD
        assert srv.count("/s.tar") == 2


def test_persistent_server_error_gives_up_after_the_retries():
    with http_server({"/s.tar": [Answer(503)]}) as srv:
        start = time.monotonic()
        with pytest.raises(CorruptShard, match=r"^cannot read: 3 attempts failed, the last with HTTP 503 Service Unav"):
            fetch(srv.url + "/s.tar", retries=2, **FAST)
        assert srv.count("/s.tar") == 3
        assert time.monotonic() - start < 2


@pytest.mark.parametrize("status, name", [(404, "Not Found"), (403, "Forbidden"), (401, "Unauthorized")])
def test_client_errors_are_named_and_not_retried(status, name):
    with http_server({"/s.tar": [Answer(status)]}) as srv:
        with pytest.raises(CorruptShard, match=f"^cannot read: HTTP {status} {name}$"):
            fetch(srv.url + "/s.tar", retries=4, **FAST)
        assert srv.count("/s.tar") == 1


def test_a_stalled_answer_times_out_and_is_retried():
    with http_server({"/s.tar": [Answer(200, SHARD, stall=30), Answer(200, SHARD)]}) as srv:
        start = time.monotonic()
        assert fetch(srv.url + "/s.tar", retries=1, **FAST) == SHARD
        assert srv.count("/s.tar") == 2
        assert time.monotonic() - start < 5


def test_a_server_that_always_stalls_fails_with_a_timeout():
    with http_server({"/s.tar": [Answer(200, SHARD, stall=30)]}) as srv:
        with pytest.raises(CorruptShard, match=r"2 attempts failed, the last with no data for 0.3 s"):
            fetch(srv.url + "/s.tar", retries=1, **FAST)
        assert srv.count("/s.tar") == 2


def test_a_cut_body_is_retried():
    with http_server({"/s.tar": [Answer(200, SHARD[:700], short=True), Answer(200, SHARD)]}) as srv:
        assert fetch(srv.url + "/s.tar", retries=1, **FAST) == SHARD
        assert srv.count("/s.tar") == 2


def test_connection_refused_is_retried_then_reported():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nobody listens there
    with pytest.raises(CorruptShard, match=r"3 attempts failed, the last with .*[Cc]onnection refused"):
        fetch(f"http://127.0.0.1:{port}/s.tar", retries=2, **FAST)


def test_malformed_url_is_not_retried():
    with pytest.raises(CorruptShard, match="cannot read: .*port"):
        fetch("http://127.0.0.1:notaport/s.tar", **FAST)


def test_default_schedule_is_four_retries_after_1_2_4_8_seconds(monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr(shards_module.time, "sleep", waits.append)  # no real waiting
    with http_server({"/s.tar": [Answer(500)]}) as srv:
        with pytest.raises(CorruptShard, match="5 attempts failed, the last with HTTP 500 Internal Server Error"):
            read_shard(srv.url + "/s.tar")
        assert srv.count("/s.tar") == 5
    assert waits == [1, 2, 4, 8]


def test_the_loader_names_the_shard_url_and_the_status():
    with http_server({"/ok.tar": [Answer(200, SHARD)], "/gone.tar": [Answer(404)]}) as srv:
        section = DataSection(train=f"{srv.url}/gone.tar::{srv.url}/ok.tar", on_error="raise", shuffle_buffer=1)
        loader = build_loader(section, "train", seq_len=4, micro_batch_size=1, world_size=1, seed=0, vocab_size=512)
        batches = iter(loader)
        with pytest.raises(DataError, match=rf"^data.train: shard {srv.url}/gone.tar: cannot read: HTTP 404 Not Found"):
            for _ in range(50):
                next(batches)

"""No bigtx process outlives its job: stuck ranks leave after SIGTERM, loader workers end with their
rank and never hold the rendezvous port."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import psutil
import pytest
import torch.distributed as dist

from bigtx.config import load_spec
from bigtx.data import build_loader
from bigtx.distributed import EXIT_STOP_TIMEOUT
from tests.harness import run_ranks, start, stray_processes, tiny_overrides, wait_until

pytestmark = pytest.mark.slow


def port_is_free(port: int) -> bool:
    """Whether a new rendezvous could listen on ``port`` (SO_REUSEADDR, as torch's store sets it, so the
    closed connections still in TIME_WAIT do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_stuck_ranks_leave_within_the_grace_period(tmp_path: Path, byte_shards: Path) -> None:
    """Rank 1's shard is a `pipe:` command that never delivers; rank 0 waits for it in the backward's
    gradient all-reduce. After SIGTERM neither can reach a step boundary: both leave within the grace
    period with the documented code, and take their children (the pipe's command) with them."""
    shards = sorted(byte_shards.glob("train-*.tar"))[:2]
    spec = load_spec("tiny", [f"data.train={shards[0]}::{shards[1]}"])
    args = dict(seq_len=64, micro_batch_size=4, world_size=2, seed=spec.run.seed, vocab_size=spec.model.vocab_size)
    first = build_loader(spec.data, "train", rank=1, **args).shards_for(epoch=0, reader=0)[0][0]
    slow = 0 if first == str(shards[0]) else 1
    urls = [f"pipe:cat {s}" for s in shards]
    urls[slow] = f"pipe:sleep 300 && cat {shards[slow]}"
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(run_dir, byte_shards, "train.max_steps=20")
    overrides[1] = f"data.train={'::'.join(urls)}"
    t_start = time.time()
    run = start("tiny", overrides, 2, tmp_path / "logs", env={"BIGTX_STOP_GRACE_S": "3"})
    started = lambda: "training tiny" in run.logs[0].read_text() or any(p.poll() is not None for p in run.procs)
    wait_until(started, 120, "rank 0 to start training")
    time.sleep(3)  # rank 0 is now in its first backward, waiting for rank 1
    assert all(p.poll() is None for p in run.procs), run.output()
    t0 = time.monotonic()
    for p in run.procs:
        p.send_signal(signal.SIGTERM)
    assert run.wait(60) == [EXIT_STOP_TIMEOUT] * 2, run.output()
    assert time.monotonic() - t0 < 3 + 15
    assert "no step boundary reached" in run.output()
    wait_until(lambda: not stray_processes(t_start), 10, f"no process left: {stray_processes(t_start)}")
    sleepers = [p for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or [])[:2] == ["sleep", "300"]]
    assert not [p for p in sleepers if p.create_time() >= t_start and p.status() != psutil.STATUS_ZOMBIE]


def test_loader_workers_end_with_the_run_and_free_the_port(tmp_path: Path, byte_shards: Path) -> None:
    """One rank with 2 loader workers, evaluations in between: once it exits, no worker is left and its
    rendezvous port can be bound again (an orphaned worker used to keep it in LISTEN)."""
    t_start = time.time()
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(run_dir, byte_shards, "train.max_steps=6", "train.eval_every=2", "data.num_workers=2")
    run = start("tiny", overrides, 1, tmp_path / "logs")
    rank = psutil.Process(run.procs[0].pid)
    # between fork and exec the child still shows this process's environment, without MASTER_PORT
    wait_until(lambda: "MASTER_PORT" in rank.environ(), 30, "the rank's environment after exec")
    port = int(rank.environ()["MASTER_PORT"])
    assert run.wait(300) == [0], run.output()
    wait_until(lambda: not stray_processes(t_start), 10, f"no process left: {stray_processes(t_start)}")
    assert port_is_free(port)


def _workers_hold_no_listening_socket(rank: int, world: int, shards: str) -> None:
    store_port = int(__import__("os").environ["MASTER_PORT"])
    me = psutil.Process()
    listening = {c.laddr.port for c in me.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    assert store_port in listening  # the check below can see the store's socket where it is
    spec = load_spec("tiny", [f"data.train={shards}", "data.num_workers=2"])
    loader = build_loader(spec.data, "train", seq_len=64, micro_batch_size=4, vocab_size=spec.model.vocab_size)
    it = iter(loader)
    next(it)
    workers = me.children(recursive=True)
    assert len([w for w in workers if w.name() == "pt_data_worker"]) == 2, [w.name() for w in workers]
    for child in workers:
        held = {c.laddr.port for c in child.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
        assert store_port not in held, f"{child.name()} {child.pid} holds the store's port {store_port}"
    loader.close()
    dist.barrier()


def test_loader_workers_do_not_inherit_the_store_socket(byte_shards: Path) -> None:
    run_ranks(_workers_hold_no_listening_socket, 1, str(byte_shards))


def _loader_workers(rank: psutil.Process) -> int:
    """How many of the rank's descendants are DataLoader workers; one that ends while being looked at
    (the fork server's short-lived helpers do) is not counted."""
    count = 0
    for child in rank.children(recursive=True):
        try:
            count += child.name() == "pt_data_worker"
        except psutil.NoSuchProcess:
            continue
    return count


def test_a_killed_rank_takes_its_workers_along(tmp_path: Path, byte_shards: Path) -> None:
    t_start = time.time()
    overrides = tiny_overrides(tmp_path / "run", byte_shards, "train.max_steps=200", "data.num_workers=2")
    run = start("tiny", overrides, 1, tmp_path / "logs")
    rank = psutil.Process(run.procs[0].pid)
    wait_until(lambda: _loader_workers(rank) == 2, 120, "two loader workers")
    run.kill(signal.SIGKILL)
    wait_until(lambda: not stray_processes(t_start), 15, f"no process left: {stray_processes(t_start)}")

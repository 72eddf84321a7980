"""Heartbeats and the hang watchdog: where each rank is, on disk, and its stacks when it stops moving.

The training thread only records ``(step, phase, since)`` in memory (``Heartbeat.step``,
``Heartbeat.mark``: a clock read and an assignment). A background thread, every ``INTERVAL_S``
seconds, writes that state to disk and checks it: when a phase has run longer than
``watchdog.factor`` x the median step time (at least ``watchdog.floor_s``), it dumps every
thread's Python stack, and on GPUs the NCCL flight recorder, once per stalled phase.

Layout under the run directory (read by ``bigtx doctor``, see ``bigtx.doctor``)::

    heartbeat/rank<R>.json       the rank's last state, replaced atomically (tmp + rename)
    hang/rank<R>-step<S>-<phase>-<UTC time>.txt     its threads' stacks, header lines "key: value"
    hang/rank<R>-step<S>-<phase>-<UTC time>.fr.pkl  NCCL flight recorder (GPU runs only)

A leaf module: it imports nothing from bigtx.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import statistics
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger("bigtx")

INTERVAL_S = 2.0  # how often the heartbeat file is written and the watchdog looks
PAUSE_S = 3 * INTERVAL_S  # a longer gap between the thread's wake-ups: the process did not run (SIGSTOP, frozen)
STEP_HISTORY = 50  # step times the median is taken over
# What a rank can be doing, in the order a step goes through them (``bigtx doctor`` compares ranks by it).
PHASES = ("startup", "data", "forward", "backward", "optimizer", "sync", "eval", "save")


class HeartbeatError(Exception):
    """A heartbeat or hang-dump file that cannot be read; the message names the file."""


@dataclass(frozen=True)
class Limits:
    """When a phase counts as stuck: past ``factor`` x the median step time, at least ``floor_s``
    seconds, at most ``cap_s`` (below the collective timeout, so the dump comes before a peer's
    timeout ends the job)."""

    factor: float
    floor_s: float
    cap_s: float

    def seconds(self, median_step_s: float | None) -> float:
        wanted = max(self.factor * median_step_s, self.floor_s) if median_step_s else self.floor_s
        return min(wanted, self.cap_s)


def heartbeat_path(run_dir: Path, rank: int) -> Path:
    return run_dir / "heartbeat" / f"rank{rank}.json"


class Heartbeat:
    """One rank's heartbeat file and watchdog thread. ``start()`` begins both; ``stop()`` (or the
    context manager's exit) writes the final state with ``ended`` set and ends the thread."""

    def __init__(self, run_dir: Path, rank: int, world_size: int, host: str, limits: Limits) -> None:
        self.run_dir = run_dir
        self.rank = rank
        self.limits = limits
        self._static = {"rank": rank, "world_size": world_size, "host": host, "pid": os.getpid()}
        # monotonic and wall clock read together once: the training thread reads only the monotonic one
        self._mono0, self._wall0 = time.monotonic(), time.time()
        self._state: tuple[int, str, float] = (0, "startup", self._mono0)
        self._step_start: float | None = None
        self._step_times: collections.deque[float] = collections.deque(maxlen=STEP_HISTORY)
        self._dumped: tuple[int, str, float] | None = None
        self._written = self._state  # the state last written
        self._paused: dict[str, Any] | None = None  # the last time the process did not run for PAUSE_S or more
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bigtx-heartbeat", daemon=True)

    # -- called by the training thread: cheap, no I/O

    def step(self, step: int) -> None:
        """Step ``step`` (counted from 1) begins."""
        now = time.monotonic()
        if self._step_start is not None:
            self._step_times.append(now - self._step_start)
        self._step_start = now
        self._state = (step, self._state[1], self._state[2])

    def mark(self, phase: str) -> float:
        """The rank enters ``phase``; returns the clock (``time.perf_counter``) for callers that time it."""
        self._state = (self._state[0], phase, time.monotonic())
        return time.perf_counter()

    # -- the background thread

    def start(self) -> Heartbeat:
        heartbeat_path(self.run_dir, self.rank).parent.mkdir(parents=True, exist_ok=True)
        self._write()
        self._thread.start()
        return self

    def stop(self, ended: str) -> None:
        """End the thread and write the final state, ``ended`` saying how (``exited``, ``error: ...``)."""
        self._done.set()
        self._thread.join(timeout=2 * INTERVAL_S)
        try:
            self._write(ended)
        except OSError as exc:  # the rank's own exit (and its error) matters more than the record of it
            log.warning("heartbeat: %s", exc)

    def __enter__(self) -> Heartbeat:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop("exited" if exc is None else f"error: {kind.__name__ if kind else ''}: {exc}"[:500])

    def _run(self) -> None:
        last = time.monotonic()
        while not self._done.wait(INTERVAL_S):
            # the monotonic clock runs on while the process is stopped: a long gap means it did not run
            # (a stopped process cannot say so itself while stopped; a frozen one may never)
            now = time.monotonic()
            if now - last >= PAUSE_S:
                step, phase, _ = self._written
                self._paused = {"from": self._wall(last), "to": self._wall(now), "step": step, "phase": phase}
            last = now
            try:
                self.check()
                self._write()
            except OSError as exc:  # a full or vanished disk must not end training
                log.warning("heartbeat: %s", exc)

    def median_step_s(self) -> float | None:
        times = tuple(self._step_times)  # one C-level copy under the GIL: safe while the loop appends
        return statistics.median(times) if times else None

    def check(self) -> Path | None:
        """The watchdog: dump stacks if the current phase has run past its limit (once per stalled
        phase); returns the dump's path when it wrote one."""
        state = self._state
        step, phase, since = state
        running = time.monotonic() - since
        limit = self.limits.seconds(self.median_step_s())
        if running <= limit or self._dumped == state:
            return None
        self._dumped = state
        path = dump_stacks(self.run_dir / "hang", self._header(step, phase, since, running, limit))
        log.warning(
            "rank %d: phase %s of step %d has run %.0fs (limit %.0fs): stacks in %s",
            self.rank,
            phase,
            step,
            running,
            limit,
            path,
        )
        return path

    def _wall(self, mono: float) -> float:
        return self._wall0 + (mono - self._mono0)

    def _header(self, step: int, phase: str, since: float, running: float, limit: float) -> dict[str, Any]:
        return {
            **self._static,
            "step": step,
            "phase": phase,
            "since": self._wall(since),
            "running_s": round(running, 1),
            "limit_s": round(limit, 1),
        }

    def _write(self, ended: str | None = None) -> None:
        step, phase, since = self._state
        record = {
            **self._static,
            "step": step,
            "phase": phase,
            "since": self._wall(since),
            "time": time.time(),
            "median_step_s": self.median_step_s(),
            "paused": self._paused,
            "ended": ended,
        }
        path = heartbeat_path(self.run_dir, self.rank)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record) + "\n")
        os.replace(tmp, path)
        self._written = (step, phase, since)


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def dump_stacks(hang_dir: Path, header: dict[str, Any]) -> Path:
    """Write every thread's Python stack (main thread first) under ``hang_dir``, after ``header`` as
    "key: value" lines and a ``top:`` line (the main thread's innermost frame); on GPUs also the
    NCCL flight recorder. Returns the text file's path."""
    hang_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = hang_dir / f"rank{header['rank']}-step{header['step']}-{header['phase']}-{stamp}.txt"
    frames = sys._current_frames()
    main = threading.main_thread()
    names = {t.ident: t.name for t in threading.enumerate()}
    order = sorted(frames, key=lambda ident: (ident != main.ident, names.get(ident, "")))
    main_stack = traceback.extract_stack(frames[main.ident]) if main.ident in frames else []
    top = f"{main_stack[-1].filename}:{main_stack[-1].lineno} in {main_stack[-1].name}" if main_stack else "unknown"
    lines = [f"{key}: {_utc(value) if key == 'since' else value}" for key, value in header.items()]
    lines.append(f"top: {top}")
    for ident in order:
        lines.append(f"--- thread {names.get(ident, '?')} ({ident}) ---")
        lines.append("".join(traceback.format_stack(frames[ident])).rstrip())
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    _dump_flight_recorder(path.with_suffix(".fr.pkl"))
    return path


def _dump_flight_recorder(path: Path) -> None:
    """On GPUs: the NCCL flight recorder's ring buffer (the last collectives each process group ran,
    with their state), a pickle that torch's ``torch.distributed.flight_recorder`` tool reads.

    It records only when TORCH_FR_BUFFER_SIZE (torch >= 2.10; TORCH_NCCL_TRACE_BUFFER_SIZE before)
    was > 0 when the process group started; ``bigtx.distributed.init`` sets it. ``_dump_fr_trace``
    (``_dump_nccl_trace`` before torch 2.10) is private and checked against torch 2.13 on a CPU
    build only: that it returns the pickled bytes on an NCCL job is what a GPU run must confirm.
    """
    import torch

    if not torch.cuda.is_available():
        return
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_backend() != "nccl":
        return
    c10d = torch._C._distributed_c10d
    dump = getattr(c10d, "_dump_fr_trace", None) or getattr(c10d, "_dump_nccl_trace", None)
    if dump is None:
        return
    try:
        path.write_bytes(dump())
    except Exception as exc:  # a diagnostic must never end the rank it is diagnosing
        log.warning("flight recorder dump failed: %s", exc)


# -- reading, for ``bigtx doctor``

HEARTBEAT_FIELDS = {
    "rank": int,
    "world_size": int,
    "host": str,
    "pid": int,
    "step": int,
    "phase": str,
    "since": float,
    "time": float,
}


def read_heartbeat(path: Path) -> dict[str, Any]:
    """One rank's heartbeat record, checked; ``HeartbeatError`` naming the file otherwise."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HeartbeatError(f"{path}: not a readable heartbeat file ({exc}); delete it, its rank rewrites it") from exc
    if not isinstance(record, dict):
        raise HeartbeatError(f"{path}: not a heartbeat record (a JSON object); delete it, its rank rewrites it")
    for key, kind in HEARTBEAT_FIELDS.items():
        value = record.get(key)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = record[key] = float(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise HeartbeatError(f"{path}: field {key!r} is {value!r}, expected {kind.__name__}; delete the file")
    paused = record.get("paused")
    if paused is not None and not (
        isinstance(paused, dict)
        and all(isinstance(paused.get(k), (int, float)) for k in ("from", "to", "step"))
        and paused.get("phase") in PHASES
    ):
        raise HeartbeatError(f"{path}: field 'paused' is {paused!r}, expected from/to/step/phase; delete the file")
    if record["phase"] not in PHASES:
        raise HeartbeatError(f"{path}: unknown phase {record['phase']!r} (one of {', '.join(PHASES)})")
    return record


def read_dump_header(path: Path) -> dict[str, str]:
    """The "key: value" header of a hang dump (up to the first thread); ``HeartbeatError`` if it has none."""
    header: dict[str, str] = {}
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("--- thread"):
                    break
                key, sep, value = line.rstrip("\n").partition(": ")
                if sep:
                    header[key] = value
    except OSError as exc:
        raise HeartbeatError(f"{path}: cannot read the hang dump ({exc})") from None
    missing = [k for k in ("rank", "step", "phase", "top") if k not in header]
    if missing or not header["rank"].isdigit() or not header["step"].isdigit():
        raise HeartbeatError(f"{path}: not a bigtx hang dump (missing or bad {', '.join(missing) or 'rank/step'})")
    return header

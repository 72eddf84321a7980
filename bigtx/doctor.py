"""`bigtx doctor RUN_DIR`: from heartbeats, hang dumps and metrics, which rank is stuck or behind, in plain words.

The rules, in order (``diagnose``):

1. ``FINISHED`` exists: the run finished (exit 0).
2. A rank whose heartbeat stopped while its peers' went on (older than the newest by more than
   ``STALE_S``, or than now while the job runs) is stuck: its process did not run at all
   (stopped, frozen, or its host is gone), so it has no stack dump either (exit 1). So is a rank
   whose heartbeat thread found, on waking, that the process had not run for ``STALE_S`` or more,
   while a peer dumped its stacks or failed (SLURM continues stopped processes to end them).
3. Otherwise, if some rank dumped its stacks for the phase it is still in: of the ranks still
   in the job, those furthest behind (earliest step, then earliest phase) are stuck, the others
   wait for them (exit 1).
4. A rank that ended with an error, or whose heartbeat is missing, is reported (exit 1).
5. The latest metrics line's slowest rank, if its busy time is ``STRAGGLER_RATIO`` x the median
   or more, is behind (exit 1, while the run is not finished).

Exit codes: 0 nothing wrong found (finished, running, or stopped cleanly), 1 a rank stuck, behind,
failed or missing, 2 bad input (no such directory, no or corrupt heartbeat files).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bigtx.checkpoint.resume import FINISHED
from bigtx.heartbeat import INTERVAL_S, PHASES, HeartbeatError, read_dump_header, read_heartbeat

STALE_S = 3 * INTERVAL_S  # a heartbeat this much older than its peers' means the rank stopped writing
STRAGGLER_RATIO = 1.5

EXIT_HEALTHY = 0
EXIT_PROBLEM = 1
EXIT_BAD_INPUT = 2


class DoctorError(Exception):
    """The run directory cannot be diagnosed; the message says why and what to do."""


@dataclass
class RankState:
    rank: int
    host: str
    pid: int
    step: int
    phase: str
    since: float
    last_heartbeat: float
    ended: str | None
    state: str = "running"  # running | silent | stuck | waiting | exited | failed
    top: str | None = None  # innermost frame of the main thread, from a hang dump of the current phase
    dump: str | None = None
    paused: dict[str, Any] | None = None  # the last time its process did not run (heartbeat's "paused")
    log: str | None = None  # its newest log under logs/ (the SLURM script's per-rank logs), for blamed ranks


@dataclass
class Report:
    run_dir: str
    status: str  # finished | running | stopped | stuck | behind | failed
    exit_code: int
    lines: list[str]
    blamed: list[dict[str, Any]] = field(default_factory=list)
    ranks: list[dict[str, Any]] = field(default_factory=list)
    straggler: dict[str, Any] | None = None

    def stuck_nodes(self) -> list[str]:
        """The hosts of the ranks found stuck, each once, in rank order."""
        if self.status != "stuck":
            return []
        return list(dict.fromkeys(b["host"] for b in self.blamed))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _where(r: RankState) -> str:
    return f"rank {r.rank} on host {r.host} (pid {r.pid})"


def _doing(r: RankState) -> str:
    return f"phase {r.phase} of step {r.step} since {_utc(r.since)}"


def load_ranks(run_dir: Path) -> list[RankState]:
    """Every rank's last heartbeat, with the matching hang dump if one was written for the phase it is
    in; ``DoctorError`` for a missing directory or corrupt files."""
    if not run_dir.is_dir():
        raise DoctorError(f"{run_dir}: no such run directory; give the run.dir of a bigtx run")
    files = sorted((run_dir / "heartbeat").glob("rank*.json"))
    if not files:
        raise DoctorError(
            f"{run_dir}: no heartbeat files under heartbeat/; not a bigtx run directory, or the run has not "
            "started (or predates heartbeats)"
        )
    try:
        beats = [read_heartbeat(p) for p in files]
        dumps = [(p, read_dump_header(p)) for p in sorted((run_dir / "hang").glob("rank*.txt"))]
    except HeartbeatError as exc:
        raise DoctorError(str(exc)) from None
    # files of ranks beyond the newest job's world size are left from an earlier, larger job
    world = max(beats, key=lambda b: b["time"])["world_size"]
    ranks = {
        b["rank"]: RankState(
            b["rank"],
            b["host"],
            b["pid"],
            b["step"],
            b["phase"],
            b["since"],
            b["time"],
            b.get("ended"),
            paused=b.get("paused"),
        )
        for b in beats
        if b["rank"] < world
    }
    for path, header in dumps:
        r = ranks.get(int(header["rank"]))
        current = r is not None and (int(header["step"]), header["phase"], header.get("since")) == (
            r.step,
            r.phase,
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r.since)),
        )
        if current and r is not None:
            r.top, r.dump = header["top"], str(path.relative_to(run_dir))
    missing = sorted(set(range(world)) - ranks.keys())
    return [ranks[k] for k in sorted(ranks)] + [
        RankState(k, "?", 0, 0, "startup", 0.0, 0.0, "missing", state="missing") for k in missing
    ]


def rank_log(run_dir: Path, rank: int) -> str | None:
    """The newest per-rank log of ``rank`` under ``logs/`` (``JOB.RESTART-rank<R>-<node>.log``, as the
    SLURM script names them), relative to ``run_dir``; None if there is none."""
    logs = [p for p in (run_dir / "logs").glob(f"*-rank{rank}-*.log") if p.is_file()]
    return str(max(logs, key=lambda p: p.stat().st_mtime).relative_to(run_dir)) if logs else None


def last_straggler(run_dir: Path) -> dict[str, Any] | None:
    """The newest metrics line's straggler fields (a line cut short by a crash is skipped)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    for line in reversed(path.read_text(errors="replace").splitlines()):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("slowest_rank"), int):
            keys = ("step", "slowest_rank", "slowest_busy_s", "median_busy_s", "slowest_data_wait_s")
            return {k: record.get(k) for k in keys}
    return None


def diagnose(run_dir: Path, now: float | None = None) -> Report:
    """Read the run directory and say what its ranks are doing; ``DoctorError`` on bad input."""
    ranks = load_ranks(run_dir)
    now = time.time() if now is None else now
    present = [r for r in ranks if r.state != "missing"]
    newest = max(r.last_heartbeat for r in present)
    live = now - newest < STALE_S
    reference = now if live else newest
    for r in present:
        if r.ended is not None:
            r.state = "exited" if r.ended == "exited" else "failed"
        elif reference - r.last_heartbeat > STALE_S:
            r.state = "silent"
    dumped = [r for r in present if r.top is not None]
    failed_any = any(r.state == "failed" for r in present)
    hosts = {r.rank: r.host for r in present}
    straggler = last_straggler(run_dir)
    if straggler is not None:
        straggler["host"] = hosts.get(straggler["slowest_rank"], "?")

    lines: list[str] = []
    blamed: list[RankState] = []
    status = "running" if live else "stopped"
    if (run_dir / FINISHED).exists():
        status = "finished"
        lines.append(f"the run finished ({(run_dir / FINISHED).read_text().strip()})")
    elif silent := [r for r in present if r.state == "silent"]:
        status, blamed = "stuck", silent
        for r in silent:
            lines.append(
                f"{_where(r)} is stuck: its last heartbeat, at {_utc(r.last_heartbeat)} "
                f"({reference - r.last_heartbeat:.0f} s before {'now' if live else 'the last of its peers'}), "
                f"found it in {_doing(r)}; no stack dump: the process did not run at all (stopped, frozen, "
                "or its host went away)"
            )
    elif paused := [
        r for r in present if r.paused and r.paused["to"] - r.paused["from"] >= STALE_S and (dumped or failed_any)
    ]:
        # it ran again later (SLURM sends SIGCONT before it ends a step), but its peers were stuck meanwhile
        status, blamed = "stuck", paused
        for r in paused:
            p = r.paused
            assert p is not None
            ended = f"; it ended with {r.ended}" if r.state == "failed" else ""
            lines.append(
                f"{_where(r)} is stuck: its process did not run for {p['to'] - p['from']:.0f} s, from "
                f"{_utc(p['from'])} to {_utc(p['to'])} (stopped or frozen), after its heartbeat found it in "
                f"phase {p['phase']} of step {p['step']}{ended}"
            )
    elif dumped:
        stalled = [r for r in present if r.state == "running" or (r.top is not None and r.state == "failed")]
        first = min((r.step, PHASES.index(r.phase)) for r in stalled)
        blamed = [r for r in stalled if (r.step, PHASES.index(r.phase)) == first]
        status = "stuck"
        for r in blamed:
            where = f", top of stack: {r.top} ({r.dump})" if r.top else " (no stack dump yet)"
            lines.append(f"{_where(r)} is stuck in {_doing(r)}{where}")
    for r in present:
        if r in blamed or status == "finished":
            continue
        ended = f"; it ended with {r.ended}" if r.state == "failed" else ""
        if r.top is not None:
            lines.append(f"{_where(r)} waited in {_doing(r)}, top of stack: {r.top} ({r.dump}){ended}")
        elif ended:
            lines.append(f"{_where(r)} was in {_doing(r)}{ended}")
    failed = [r for r in present if r.state == "failed"]
    if status in ("running", "stopped") and failed:
        status, blamed = "failed", failed
    missing = [r for r in ranks if r.state == "missing"] if status != "finished" else []
    for r in missing:
        lines.append(f"rank {r.rank} wrote no heartbeat (it never started, or its run directory is not shared)")
    if status in ("running", "stopped") and missing:
        status, blamed = "failed", missing
    if straggler is not None:
        s = straggler
        ratio = s["slowest_busy_s"] / s["median_busy_s"] if s["median_busy_s"] else float("inf")
        behind = ratio >= STRAGGLER_RATIO and len(present) > 1
        lines.append(
            f"slowest rank at step {s['step']}: rank {s['slowest_rank']} on host {s['host']}, busy "
            f"{s['slowest_busy_s']:.3f} s per step against a median of {s['median_busy_s']:.3f} s "
            f"(data wait {s['slowest_data_wait_s']:.3f} s){': behind' if behind else ''}"
        )
        if behind and status in ("running", "stopped"):
            status = "behind"
            blamed = [r for r in present if r.rank == s["slowest_rank"]]
    for r in blamed:
        r.state = "stuck" if status == "stuck" else r.state
        r.log = rank_log(run_dir, r.rank)
        if r.log:
            lines.append(f"rank {r.rank}'s log: {r.log}")
    if status == "running":
        steps = sorted({r.step for r in present})
        lines.insert(0, f"running: {len(present)} rank(s) at step {steps[-1]}, heartbeats current")
    elif status == "stopped":
        lines.insert(0, f"not running: last heartbeat at {_utc(newest)}; no rank was stuck when it stopped")
    code = EXIT_PROBLEM if status in ("stuck", "behind", "failed") else EXIT_HEALTHY
    return Report(
        str(run_dir),
        status,
        code,
        lines,
        [asdict(r) for r in blamed],
        [asdict(r) for r in ranks],
        straggler,
    )

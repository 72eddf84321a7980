"""Processes that do not outlive the job: tied to their parent, and ending their own children.

A leaf module (it imports nothing from bigtx) used by the trainer, the data loader's workers and
``bigtx launch local``. Linux only where the kernel is asked (``prctl``); elsewhere the calls do
nothing and say so by their return value.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def seconds_from_env(name: str, default: str) -> float:
    """A positive, finite number of seconds from the environment; ``ValueError`` naming the variable."""
    raw = os.environ.get(name, default)
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise ValueError(f"{name}: {raw!r} is not a positive number of seconds (default {default})")
    return value


def stop_grace() -> float:
    """Seconds a rank has after SIGTERM/SIGUSR1/SIGINT to reach a step boundary ($BIGTX_STOP_GRACE_S, default 120)."""
    return seconds_from_env("BIGTX_STOP_GRACE_S", "120")


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent exits; True if it was set.

    Closes the window where the parent died before the request: then this process sends itself
    ``sig`` right away.
    """
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # the parent is already gone: no death signal will come
        os.kill(os.getpid(), sig)
    return True


def exit_with(pid: int) -> None:
    """End this process (``os._exit(1)``) as soon as process ``pid`` has ended; returns at once.

    For processes whose parent is not the one they serve (a DataLoader worker forked by a fork
    server serves the rank, not the server), so that a parent-death signal cannot cover them.
    A daemon thread waits on a pidfd (Linux >= 5.3), else checks every half second.
    """

    def wait() -> None:
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            while _exists(pid):
                time.sleep(0.5)
        else:
            select.select([fd], [], [])
        os._exit(1)

    threading.Thread(target=wait, name=f"bigtx-exit-with-{pid}", daemon=True).start()


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_children(sig: int = signal.SIGKILL) -> int:
    """Send ``sig`` to every descendant of this process (loader workers, ``pipe:`` commands); returns
    how many were signalled."""
    import psutil

    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return 0
    for child in children:
        try:
            child.send_signal(sig)
        except psutil.Error:
            pass
    return len(children)

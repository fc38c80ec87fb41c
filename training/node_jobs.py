"""Jobs on their critical path on this node, and background work that yields to them.

A job is on its critical path from its start until its new version is live (or it ends
without one); what a job does after that, the version's graph export (seconds of every core:
an OpenVINO conversion and an INT8 calibration), serves no one waiting. On a small node that
export slows the next retrain by half (measured on 2 cores: a head-only retrain beside the
previous version's export took 6.3 s instead of 4.4 s, even at niceness 10). So a job holds
a shared lock on a file of this node while it is critical, and the export's parent stops its
child (SIGSTOP) while any other process holds it, continuing it (SIGCONT) once none does;
at most ``max_pause_s`` in all, so a node that always has a job still gets its graphs.

The lock file lives in a directory private to this user (0700; another user could otherwise
hold the lock and stall our exports). The lock is ``flock``: the kernel drops it with its
process, so a job that dies never leaves its node paused. Other nodes are not concerned: a
job elsewhere does not share these cores.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from training.image_cache import private_dir

log = logging.getLogger(__name__)

POLL_S = 0.2
"""How often a yielding export looks at the lock."""
_held_here = 0
"""Holds of this process: its own exports are its critical work then (graphs before publish)
and do not yield (a lock of this process would otherwise pause them)."""


def lock_path() -> Path | None:
    """This node's lock file of critical jobs (None when no private directory can be made)."""
    root = Path(tempfile.gettempdir()) / f"refit-jobs-{os.getuid()}"
    return root / "critical.lock" if private_dir(root) else None


class Critical:
    """This job's shared hold on the node's lock, from creation until :meth:`release`."""

    def __init__(self, path: Path | None = None) -> None:
        self._fd: int | None = None
        path = path or lock_path()
        if path is None:
            return
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            log.warning("node lock %s unusable: %s", path, exc)
            return
        fcntl.flock(fd, fcntl.LOCK_SH)  # a checker holds it exclusively for an instant only
        self._fd = fd
        global _held_here
        _held_here += 1

    def release(self) -> None:
        """No longer critical (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)  # the lock goes with the descriptor
            self._fd = None
            global _held_here
            _held_here -= 1

    def __enter__(self) -> Critical:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def others_critical(path: Path | None = None) -> bool:
    """Whether a job (another open of the lock file) is on its critical path now."""
    path = path or lock_path()
    if path is None:
        return False
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def wait_quiet(max_s: float, path: Path | None = None) -> bool:
    """Wait until no other job on this node is critical, at most ``max_s``; whether none is
    (background work that cannot be stopped midway, like a replica's mode measurements,
    starts once the node is quiet)."""
    path = path or lock_path()
    deadline = time.monotonic() + max_s
    while others_critical(path):
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)
    return True


@contextlib.contextmanager
def yielding(
    proc: subprocess.Popen[Any], *, max_pause_s: float = 300.0, path: Path | None = None
) -> Iterator[None]:
    """While inside, the child ``proc`` is stopped whenever another job on this node is
    critical (and continued when none is, and on leaving), for at most ``max_pause_s``."""
    path = path or lock_path()
    done = threading.Event()

    def watch() -> None:
        paused, paused_s, since = False, 0.0, 0.0
        try:
            while not done.wait(POLL_S):
                busy = paused_s + (time.monotonic() - since if paused else 0) < max_pause_s
                busy = busy and not _held_here and others_critical(path)
                if busy != paused:
                    # send_signal skips a child already reaped (its pid may be reused)
                    proc.send_signal(signal.SIGSTOP if busy else signal.SIGCONT)
                    if busy:
                        since = time.monotonic()
                    else:
                        paused_s += time.monotonic() - since
                    paused = busy
        except ProcessLookupError:  # it ended
            return
        finally:
            if paused:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGCONT)

    thread = threading.Thread(target=watch, name="refit-export-yields", daemon=True)
    if path is not None:
        thread.start()
    try:
        yield
    finally:
        done.set()
        if thread.is_alive():
            thread.join(timeout=5)


__all__ = ["Critical", "lock_path", "others_critical", "wait_quiet", "yielding"]

"""Background work yields to jobs on their critical path: a real child process is stopped
while another process holds the node's lock, continued when it lets go, never paused by a
hold of its own process, and paused no longer than its budget."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import CriticalJob, critical_job
from training.node_jobs import Critical, others_critical, yielding


def _state(proc: subprocess.Popen[str]) -> str:
    """The kernel's state letter of a process (``T``: stopped)."""
    return Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.fixture
def child() -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time\nwhile True: time.sleep(0.01)"], text=True
    )
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[tuple[Path, CriticalJob]]:
    """Another process on its critical path (until it lets go)."""
    lock = tmp_path / "critical.lock"
    with critical_job(lock) as job:
        yield lock, job


def test_a_child_stops_while_another_job_is_critical(
    child: subprocess.Popen[str], holder: tuple[Path, CriticalJob]
) -> None:
    lock, other = holder
    assert others_critical(lock)
    with yielding(child, path=lock):
        _until(lambda: _state(child) == "T", "not stopped while another job was critical")
        other.let_go()
        assert not others_critical(lock)
        _until(lambda: _state(child) != "T", "not continued once no job was critical")
    assert _state(child) != "T"


def test_leaving_continues_the_child_and_the_pause_is_bounded(
    child: subprocess.Popen[str], holder: tuple[Path, CriticalJob]
) -> None:
    lock, _ = holder
    with yielding(child, path=lock):
        _until(lambda: _state(child) == "T", "not stopped")
    assert _state(child) != "T"  # continued on leaving, the other job still critical
    with yielding(child, path=lock, max_pause_s=0.5):
        _until(lambda: _state(child) == "T", "not stopped")
        _until(lambda: _state(child) != "T", "paused past its budget")
        time.sleep(0.5)
        assert _state(child) != "T"  # and not again


def test_a_hold_of_its_own_process_does_not_stop_it(
    child: subprocess.Popen[str], tmp_path: Path
) -> None:
    """A job's own export (graphs before publish, the legacy path) is its critical work."""
    lock = tmp_path / "critical.lock"
    with Critical(lock), yielding(child, path=lock):
        assert others_critical(lock)  # what another process would see
        time.sleep(1.0)  # five looks at the lock
        assert _state(child) != "T"
    assert not others_critical(lock)  # released

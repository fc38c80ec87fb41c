"""``refit up`` stopped by SIGTERM in the middle of its bootstrap leaves no process behind
(issue 10, class 12). A real ``refit up`` in its own session: its own SeaweedFS, its own
local Ray (Serve, and Ray Train during the demo). Every process it starts is found through its
own process tree and session, sampled while it runs, and killed by pid if a test fails."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import free_port

pytestmark = [pytest.mark.fault, pytest.mark.serve]

STOP_BOUND_S = 90.0
"""The documented bound: the store's stop timeout (30 s) plus Serve's and Ray's shutdown."""


def _stat(pid: int) -> tuple[int, int, int] | None:
    """(parent pid, session id, start time) of a live process, None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    if fields[0] == "Z":  # a zombie has exited; only its parent's wait() is missing
        return None
    return int(fields[1]), int(fields[3]), int(fields[19])


class _Run:
    """One ``refit up`` and every process seen in its tree or session: pid -> start time."""

    def __init__(self, tmp: Path, *extra: str) -> None:
        self.log = tmp / "up.log"
        env = {
            **os.environ,
            "REFIT_STORE__S3_PORT": "0",
            "REFIT_RAY__NUM_CPUS": "4",
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("RAY_ADDRESS", None)  # its own cluster, not this session's
        self.data_dir = tmp / "d"
        cmd = [sys.executable, "-m", "service.cli", "up", "--data-dir", str(self.data_dir)]
        cmd += ["--port", str(free_port()), *extra]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(  # fixed arguments
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.seen: dict[int, int] = {}

    def sample(self) -> None:
        stats = {int(p): _stat(int(p)) for p in os.listdir("/proc") if p.isdigit()}
        tree = {self.proc.pid}
        changed = True
        while changed:
            changed = False
            for pid, st in stats.items():
                if st is not None and pid not in tree and (st[0] in tree or st[1] == self.proc.pid):
                    tree.add(pid)
                    changed = True
        for pid in tree:
            st = stats.get(pid)
            if st is not None:
                self.seen.setdefault(pid, st[2])

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log.read_text(errors="replace"):
            assert self.proc.poll() is None, self.log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, f"no {text!r}:\n{self.log.read_text()[-3000:]}"
            self.sample()
            time.sleep(0.2)
        self.sample()

    def left(self) -> list[int]:
        """Processes of this run still alive (same pid and start time)."""
        return [p for p, start in self.seen.items() if (st := _stat(p)) and st[2] == start]

    def kill_all(self) -> None:
        for pid in self.left():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def up(tmp_path: Path) -> Iterator[type[_Run]]:
    runs: list[_Run] = []

    class Tracked(_Run):
        def __init__(self, *extra: str) -> None:
            super().__init__(tmp_path, *extra)
            runs.append(self)

    yield Tracked
    for run in runs:
        run.kill_all()
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()


def _stop_and_check(run: _Run) -> float:
    run.sample()
    assert len(run.seen) > 1, "nothing started yet: the phase under test was not reached"
    start = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    while run.proc.poll() is None:
        run.sample()  # processes started while it stops count too
        assert time.monotonic() - start < STOP_BOUND_S, "refit up did not stop in time"
        time.sleep(0.2)
    took = time.monotonic() - start
    print(f"refit up stopped {took:.1f} s after SIGTERM")  # the figure in the note
    assert run.proc.returncode == 0, run.log.read_text(errors="replace")[-3000:]
    deadline = time.monotonic() + 15  # workers notice their raylet is gone within seconds
    while run.left() and time.monotonic() < deadline:
        time.sleep(0.5)
    left = run.left()  # pids of this run's own tree and session
    assert left == [], f"processes of the run outlived it: {left}"
    return took


def test_sigterm_while_ray_starts(up: type[_Run]) -> None:
    run = up("--no-demo")
    deadline = time.monotonic() + 90
    # the store answered (it wrote connection.json) and the run's own process tree grew past
    # refit up and its store: Ray's first processes exist, Ray is starting. Processes are
    # told apart by the tree this run started, never by their names.
    while not ((run.data_dir / "connection.json").exists() and len(run.left()) > 2):
        assert time.monotonic() < deadline, run.log.read_text(errors="replace")[-3000:]
        assert run.proc.poll() is None, run.log.read_text(errors="replace")[-3000:]
        run.sample()
        time.sleep(0.05)
    assert "serving on" not in run.log.read_text()  # still bootstrapping
    _stop_and_check(run)


def test_sigterm_during_the_demo_training(up: type[_Run]) -> None:
    run = up()
    run.wait_for("training the pretrained base", 180)
    run.wait_for("(digits-base) epoch 1/", 240)  # the base job trains
    _stop_and_check(run)
    assert "signal received" in run.log.read_text()


def test_a_fresh_up_with_the_demo_has_a_quiet_console(up: type[_Run]) -> None:
    """The console of a fresh ``refit up`` shows the URL, where the tokens are, and each
    demo job's start, epochs and end; no line repeats more than 3 times, no token is printed,
    and Ray's output is in the data dir's log files."""
    run = up()
    run.wait_for("[refit] ready on", 420)
    text = run.log.read_text(errors="replace")
    lines = [line for line in text.splitlines() if line.strip()]
    repeated = {line: n for line, n in Counter(lines).items() if n > 3}
    assert repeated == {}, text[-3000:]
    tokens = json.loads((run.data_dir / "connection.json").read_text())
    assert tokens["admin_token"] not in text
    assert tokens["predict_token"] not in text
    assert "connection.json" in text
    assert re.search(r"job \S+ \(digits-base\) epoch 6/6", text), text[-3000:]
    assert re.search(r"job \S+ \(digits-5to9\) started", text), text[-3000:]
    assert re.search(r"job \S+ \(digits-5to9\) succeeded: version \S+ is live", text)
    assert "(TrainController" not in text  # Ray's workers write to their own logs
    assert (run.data_dir / "logs" / "ray-driver.log").exists()
    assert (run.data_dir / "logs" / "ray").is_dir()
    _stop_and_check(run)

"""The embedded store dies with the process that started it, even one killed with SIGKILL
(no orphaned SeaweedFS after a crashed ``refit up``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

CHILD = """
import json, sys, time
from pathlib import Path
from service.embedded_store import EmbeddedStore
store = EmbeddedStore(Path(sys.argv[1]), bucket="refit")
store.start()
print(json.dumps({"weed": store.process.pid}), flush=True)
time.sleep(600)
"""


pytestmark = pytest.mark.fault


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie waiting for its reaper is gone for our purpose
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[-1].split()[0] != "Z"


def test_store_dies_with_a_killed_parent(tmp_path: Path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        weed = json.loads(parent.stdout.readline())["weed"]
        assert _alive(weed)
        os.kill(parent.pid, signal.SIGKILL)  # no chance to stop the store itself
        parent.wait(timeout=10)
        deadline = time.monotonic() + 40  # SeaweedFS takes about 15 s to stop
        while _alive(weed):
            assert time.monotonic() < deadline, "the store outlived its parent"
            time.sleep(0.5)
    finally:
        if parent.poll() is None:
            parent.kill()

"""A launcher that runs nothing: it records what the job runner asked of it, and a test
decides when and how each run ends (the runner's state machine without Ray)."""

from __future__ import annotations

import threading
from typing import Any

from service.control.launchers import RunEnd


class RecordingLauncher:
    """Where the runner would start a job: records it; a run ends when stopped or when the
    test calls :meth:`end`. Owner tokens are ``recording:{job_id}``, so a second instance
    (a restarted runner's) owns the first one's runs."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.stopped: list[str] = []
        self.cleared: list[str] = []
        self.unclaimed: list[str] = []
        self.ends: dict[str, RunEnd] = {}
        self.idle_calls = 0
        self._lock = threading.Lock()

    def end(self, job_id: str, end: RunEnd | None = None) -> None:
        """The run of ``job_id`` ends (the runner sees it at its next pass)."""
        with self._lock:
            self.ends[job_id] = end or RunEnd()

    def claim(self, job_id: str) -> str:
        return f"recording:{job_id}"

    def unclaim(self, job_id: str) -> None:
        self.unclaimed.append(job_id)

    def start(self, job_id: str, spec: dict[str, Any], owner: str) -> None:
        assert owner == self.claim(job_id)
        with self._lock:
            self.ends.pop(job_id, None)
        self.started.append(job_id)

    def poll(self, job_id: str) -> RunEnd | None:
        with self._lock:
            return self.ends.pop(job_id, None)

    def stop(self, job_id: str) -> None:
        self.stopped.append(job_id)
        self.end(job_id, RunEnd("stopped"))

    def forget(self, job_id: str) -> None:
        with self._lock:
            self.ends.pop(job_id, None)

    def owns(self, job_id: str, owner: str | None) -> bool:
        return owner == self.claim(job_id)

    def clear(self, job_id: str, owner: str | None) -> None:
        self.cleared.append(job_id)

    def idle(self, running: int) -> None:
        self.idle_calls += 1

    def stats(self) -> dict[str, Any]:
        return {"recorded": len(self.started)}

    def close(self) -> None:
        pass

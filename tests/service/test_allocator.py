"""``refit up``'s allocator: jemalloc preloaded by restarting the process once, where it is
installed (``make setup`` installs Debian's libjemalloc2 as root)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from service.allocator import (
    jemalloc_library,
    reexec_with_jemalloc,
    without_preloaded_allocator,
)


def test_disabled_or_already_preloaded_does_not_restart(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert reexec_with_jemalloc(["-c", "pass"], enabled=False) == "glibc"
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert reexec_with_jemalloc(["-c", "pass"]) == "jemalloc"


@pytest.mark.skipif(jemalloc_library() is None, reason="libjemalloc2 is not installed here")
def test_restart_runs_with_jemalloc_mapped() -> None:
    code = (
        "import sys\n"
        "from service.allocator import reexec_with_jemalloc\n"
        "allocator = reexec_with_jemalloc(['-c', sys.argv[-1]])\n"
        "print(allocator, 'libjemalloc' in open('/proc/self/maps').read())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    out = subprocess.run(  # fixed arguments
        [sys.executable, "-c", code, code], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["jemalloc", "True"]


def test_system_allocator_env_drops_the_preload_and_tunes_glibc(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """OpenVINO's processes run glibc malloc, tuned to reuse large blocks; a tunable the
    caller set wins, and glibc accepts the result (a child reports itself tuned)."""
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 /opt/x.so")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1024")
    env = without_preloaded_allocator()
    assert env["LD_PRELOAD"] == "/opt/x.so"
    tunables = env["GLIBC_TUNABLES"].split(":")
    assert "glibc.malloc.trim_threshold=1024" in tunables  # the caller's own
    assert "glibc.malloc.mmap_threshold=33554432" in tunables
    assert sum(t.startswith("glibc.malloc.trim_threshold") for t in tunables) == 1
    child = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"} | {
        "GLIBC_TUNABLES": env["GLIBC_TUNABLES"]
    }
    code = "from service.allocator import current_allocator; print(current_allocator())"
    out = subprocess.run(  # fixed arguments
        [sys.executable, "-c", code], capture_output=True, text=True, env=child, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "glibc-tuned"

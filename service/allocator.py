"""The memory allocator of ``refit up`` and the serving benchmarks: jemalloc where installed.

glibc malloc costs about a fifth of CPU inference throughput here (fragmentation of the many
short-lived tensors of decode and preprocessing); jemalloc, preloaded into the process that
starts Ray, is inherited by every Ray process it starts.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

JEMALLOC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
)


def jemalloc_library() -> str | None:
    """The installed jemalloc (Debian's ``libjemalloc2``), or None."""
    return next((p for p in JEMALLOC_PATHS if os.path.exists(p)), None)


def current_allocator() -> str:
    """``jemalloc`` when this process runs with it preloaded, else ``glibc``."""
    return "jemalloc" if "jemalloc" in os.environ.get("LD_PRELOAD", "") else "glibc"


def without_preloaded_allocator() -> dict[str, str]:
    """Environment for a process that must run with the system allocator: this process's
    ``LD_PRELOAD`` less any preloaded malloc. OpenVINO aborts ("double free or corruption")
    under a preloaded jemalloc, or TBB's malloc proxy (measured with OpenVINO 2026.4)."""
    kept = [
        p
        for p in os.environ.get("LD_PRELOAD", "").split()
        if "jemalloc" not in p and "tbbmalloc" not in p
    ]
    return {"LD_PRELOAD": " ".join(kept)}


def reexec_with_jemalloc(argv: Sequence[str], *, enabled: bool = True) -> str:
    """Restart this process as ``python *argv`` with jemalloc preloaded, once (the preload
    must be there before the process starts). Returns the allocator in use when it does not
    restart: ``jemalloc``, or ``glibc`` when disabled or not installed."""
    lib = jemalloc_library()
    if current_allocator() == "jemalloc" or not enabled or lib is None:
        return current_allocator()
    preload = " ".join(p for p in (lib, os.environ.get("LD_PRELOAD", "")) if p)
    sys.stdout.flush()
    sys.stderr.flush()
    env = {**os.environ, "LD_PRELOAD": preload}
    # this interpreter with the caller's own arguments: nothing from a client
    os.execve(sys.executable, [sys.executable, *argv], env)  # noqa: S606
    raise AssertionError("unreachable")  # execve does not return


__all__ = [
    "current_allocator",
    "jemalloc_library",
    "reexec_with_jemalloc",
    "without_preloaded_allocator",
]

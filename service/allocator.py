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
    """``jemalloc`` when this process runs with it preloaded, else ``glibc-tuned`` (glibc
    with :data:`GLIBC_MALLOC_TUNABLES`' large-block reuse) or ``glibc``."""
    if "jemalloc" in os.environ.get("LD_PRELOAD", ""):
        return "jemalloc"
    tuned = "glibc.malloc.mmap_threshold" in os.environ.get("GLIBC_TUNABLES", "")
    return "glibc-tuned" if tuned else "glibc"


GLIBC_MALLOC_TUNABLES = (
    "glibc.malloc.mmap_threshold=33554432",
    "glibc.malloc.trim_threshold=268435456",
)
"""glibc malloc kept from handing every large block back to the kernel: by default a block
over 128 KiB (a request's crops, a batch's float input: 0.15-20 MB) is a fresh ``mmap`` whose
pages fault in, zeroed, on first touch, and is unmapped when freed; below 32 MiB it now comes
from the heap and is reused (normalising a batch of 16 crops: 7.1 ms -> 2.9 ms here)."""


def without_preloaded_allocator() -> dict[str, str]:
    """Environment for a process that must run with the system allocator: this process's
    ``LD_PRELOAD`` less any preloaded malloc, and glibc's malloc tuned to reuse large blocks
    (:data:`GLIBC_MALLOC_TUNABLES`). OpenVINO aborts ("double free or corruption") under a
    preloaded jemalloc, or TBB's malloc proxy (measured with OpenVINO 2026.4)."""
    kept = [
        p
        for p in os.environ.get("LD_PRELOAD", "").split()
        if "jemalloc" not in p and "tbbmalloc" not in p
    ]
    tunables = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t]
    names = {t.split("=", 1)[0] for t in tunables}  # the caller's own settings win
    tunables += [t for t in GLIBC_MALLOC_TUNABLES if t.split("=", 1)[0] not in names]
    return {"LD_PRELOAD": " ".join(kept), "GLIBC_TUNABLES": ":".join(tunables)}


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
    "GLIBC_MALLOC_TUNABLES",
    "current_allocator",
    "jemalloc_library",
    "reexec_with_jemalloc",
    "without_preloaded_allocator",
]

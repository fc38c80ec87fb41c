"""A closed-loop HTTP load generator (asyncio + aiohttp) and helpers shared by the serving
benchmarks: ``concurrency`` clients each send the next request when the last one answered."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from PIL import Image


def reexec_with_jemalloc(enabled: bool) -> str:
    """Restart this script with jemalloc preloaded (Ray's workers inherit it), once.
    Returns the allocator in use: glibc malloc costs about a fifth of CPU inference here."""
    from service.allocator import reexec_with_jemalloc as reexec

    return reexec(sys.argv, enabled=enabled)  # the same script, same arguments


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for the app under test (``service.ports``)."""
    from service.ports import listen_port

    return listen_port()


def digit_jpegs(n: int, size: int = 224, offset: int = 0) -> tuple[list[bytes], list[int]]:
    """``n`` scikit-learn digits, upscaled to ``size`` px RGB JPEGs, and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    out = []
    for img in d.images[offset : offset + n]:
        arr = (img / 16 * 255).astype(np.uint8)
        pil = Image.fromarray(arr).resize((size, size), Image.Resampling.BILINEAR).convert("RGB")
        buf = io.BytesIO()
        pil.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out, [int(t) for t in d.target[offset : offset + n]]


def descendants(root: int, *, skip: tuple[int, ...] = ()) -> list[int]:
    """Pids below ``root`` (its process tree, from /proc: processes this script started),
    leaving out ``skip`` and everything below them."""
    import os

    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        kids = [c for c, p in parents.items() if p == pid and c not in skip]
        out += kids
        todo += kids
    return out


def process_label(pid: int) -> str:
    """A label for a report (never a selector): the process's name (Ray titles its workers
    ``ray::ClassName``)."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def tree_rss_bytes(
    root: int, *, skip: tuple[int, ...] = (), into: dict[str, int] | None = None
) -> tuple[int, int]:
    """Resident memory of ``root``'s descendants (not ``root`` itself) and their count,
    leaving out the processes ``skip`` (pids this script started, and their children).
    ``into``: also each process's RSS, labelled with its pid and name."""
    import os

    total, count = 0, 0
    for pid in descendants(root, skip=skip):
        try:
            with open(f"/proc/{pid}/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            continue
        total, count = total + rss, count + 1
        if into is not None:
            into[f"{pid} {process_label(pid)}"] = rss
    return total, count


@dataclass
class LoadResult:
    """What one load run saw."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """Requests/s, p50/p99 in ms, error count."""
        lat = np.array(self.latencies) * 1000 if self.latencies else np.array([0.0])
        return {
            "requests": len(self.latencies),
            "req_per_s": len(self.latencies) / max(1e-9, self.seconds),
            "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)),
            "errors": self.errors,
        }


RawBody = tuple[bytes, dict[str, str]]
"""A request body sent as it is, with its headers (content type, binary header length)."""


def multipart_body(jpeg: bytes) -> RawBody:
    """Refit's v1 predict as a multipart form: the JPEG as a file, ``top_k`` 1."""
    from urllib3.filepost import encode_multipart_formdata

    data, ctype = encode_multipart_formdata(
        {"file": ("image.jpg", jpeg, "image/jpeg"), "top_k": "1"}
    )
    return data, {"Content-Type": ctype}


def oip_binary_body(jpeg: bytes) -> RawBody:
    """An Open Inference Protocol infer request with the binary tensor extension (as
    tritonclient sends it): a JSON header, then the BYTES element (4-byte little-endian
    length, the JPEG), no base64."""
    blob = len(jpeg).to_bytes(4, "little") + jpeg
    tensor = {
        "name": "images",
        "shape": [1],
        "datatype": "BYTES",
        "parameters": {"binary_data_size": len(blob)},
    }
    header = json.dumps({"inputs": [tensor], "parameters": {"top_k": 1}}).encode()
    return header + blob, {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }


async def _run(
    url: str | list[str],
    bodies: list[dict[str, Any]] | list[RawBody],
    *,
    concurrency: int,
    seconds: float,
    headers: dict[str, str],
    on_response: Callable[[int, float, int, dict[str, Any] | None], None] | None,
) -> LoadResult:
    result = LoadResult()
    deadline = time.perf_counter() + seconds
    limits = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=limits, headers=headers) as session:

        async def client(i: int) -> None:
            n = i
            pick = random.Random(i)  # several URLs: one at random per request, reproducibly
            while time.perf_counter() < deadline:
                body = bodies[n % len(bodies)]
                n += concurrency
                target = url if isinstance(url, str) else pick.choice(url)
                start = time.perf_counter()
                try:
                    if isinstance(body, tuple):  # sent as it is
                        post = session.post(target, data=body[0], headers=body[1])
                    else:
                        post = session.post(target, json=body)
                    async with post as resp:
                        payload = await resp.json(content_type=None) if resp.status == 200 else None
                        status = resp.status
                except aiohttp.ClientError:
                    status, payload = 0, None
                end = time.perf_counter()
                result.statuses[status] = result.statuses.get(status, 0) + 1
                if status == 200:
                    result.latencies.append(end - start)
                else:
                    result.errors += 1
                if on_response is not None:
                    on_response(i, end, status, payload)

        start = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(concurrency)))
        result.seconds = time.perf_counter() - start
    return result


def run_load(
    url: str | list[str],
    images: list[bytes],
    *,
    concurrency: int,
    seconds: float,
    token: str | None = None,
    on_response: Callable[[int, float, int, dict[str, Any] | None], None] | None = None,
    body: Callable[[str], dict[str, Any]] | None = None,
    raw: Callable[[bytes], RawBody] | None = None,
) -> LoadResult:
    """POST one base64 image per request to ``url`` (several: one picked at random per
    request) from ``concurrency`` closed-loop clients for ``seconds``.
    ``on_response(client, time, status, payload)`` sees every answer. ``body``: the JSON
    body of one base64 image (default: Refit's and the TorchServe handler's
    ``{"images": [...], "top_k": 1}``); ``raw``: instead, a body of the encoded image sent
    as it is (:func:`multipart_body`, :func:`oip_binary_body`)."""
    bodies: list[dict[str, Any]] | list[RawBody]
    if raw is not None:
        bodies = [raw(i) for i in images]
    else:
        make = body or (lambda b64: {"images": [b64], "top_k": 1})
        bodies = [make(base64.b64encode(i).decode()) for i in images]
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return asyncio.run(
        _run(
            url,
            bodies,
            concurrency=concurrency,
            seconds=seconds,
            headers=headers,
            on_response=on_response,
        )
    )


def start_session(argv: list[str], *, env: dict[str, str], log: Path, cwd: Path) -> Any:
    """Start ``argv`` (fixed arguments, no shell) in a session of its own, output to ``log``:
    :func:`stop_session` stops it and all it started by that session's process group."""
    with log.open("wb") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd
        )


def rss_bytes(pid: int) -> int:
    """Resident memory of one process."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_session(proc: Any, timeout_s: float = 30.0) -> None:
    """Stop the whole process group of a session we started (``start_new_session``): the
    process and everything it started, never anything by name; SIGTERM, then SIGKILL after
    ``timeout_s``. A peer must be gone before the next configuration starts."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=timeout_s)

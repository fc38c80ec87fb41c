"""Plain-ASGI middleware: header and body size caps before any parsing, and request metrics.

Plain ASGI rather than Starlette's ``BaseHTTPMiddleware``, which runs every request through
an extra task group and stream (a measurable cost per request on two cores).
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from prometheus_client import Counter, Histogram

from service.request_errors import HeadersTooLargeError, TooLargeError
from training.storage.errors import RefitError

Scope = dict[str, Any]


async def _send_error(send: Any, exc: RefitError) -> None:
    body = json.dumps(exc.to_dict()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": int(exc.status),
            "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": body})


class HeaderLimit:
    """Refuses requests with more than ``max_headers`` header fields or more than
    ``max_bytes`` of them in all with 431, before any route runs (a 1 MB ``Authorization``
    never reaches a comparison)."""

    def __init__(self, app: Any, *, max_headers: int, max_bytes: int) -> None:
        self.app, self.max_headers, self.max_bytes = app, max_headers, max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = scope.get("headers") or []
            size = sum(len(k) + len(v) for k, v in headers)
            if len(headers) > self.max_headers:
                message = f"{len(headers)} header fields; at most {self.max_headers}"
                await _send_error(send, HeadersTooLargeError(message, field="headers"))
                return
            if size > self.max_bytes:
                message = f"{size} bytes of headers; at most {self.max_bytes}"
                await _send_error(send, HeadersTooLargeError(message, field="headers"))
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuses a request body over its route's limit with 413 naming ``body``: from the
    declared ``Content-Length`` before reading anything, else while it streams in (the
    body is buffered up to the limit, then handed on). Routes parse only what passed."""

    def __init__(self, app: Any, *, default: int, limits: list[tuple[str, int]]) -> None:
        self.app, self.default = app, default
        self.limits = [(re.compile(pattern), limit) for pattern, limit in limits]

    def limit_for(self, path: str) -> int:
        """The byte limit of a path (the first pattern that matches, else the default)."""
        return next((n for p, n in self.limits if p.fullmatch(path)), self.default)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in {"GET", "HEAD", "OPTIONS"}:
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_error(
                send, TooLargeError(f"body of {int(declared)} bytes exceeds {limit}", field="body")
            )
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                await self.app(scope, _replay([message]), send)
                return
            size += len(message.get("body", b""))
            if size > limit:
                await _send_error(send, TooLargeError(f"body exceeds {limit} bytes", field="body"))
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], then=receive), send)


def _replay(messages: list[dict[str, Any]], then: Any = None) -> Any:
    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        if then is not None:
            return await then()  # http.disconnect, when the client goes away later
        return {"type": "http.disconnect"}

    return receive


class ObserveRequests:
    """Counts requests by route template and status, and times them."""

    def __init__(self, app: Any, *, requests_total: Counter, latency: Histogram) -> None:
        self.app, self.requests_total, self.latency = app, requests_total, latency

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering

        async def send_observed(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:
            # the router writes the matched route into the shared scope: its *template* (a
            # fixed set) is the label, never the raw path
            label = getattr(scope.get("route"), "path", "unmatched")
            self.requests_total.labels(label, str(status)).inc()
            self.latency.labels(label).observe(time.perf_counter() - start)

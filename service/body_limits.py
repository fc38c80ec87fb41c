"""The byte limits of request bodies, by path: one table for the app (``BodyLimit``
middleware) and for HAProxy (``refit-haproxy`` refuses a declared ``Content-Length`` over
it and closes the connection). Imports no web framework: HAProxy's launcher reads it."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # settings cost HAProxy's launcher 0.3 s at every reload
    from service.settings import ServeSettings

ADMIN_BODY_BYTES = 1024 * 1024
"""Bodies of every route but predict, infer, feedback and import: specs and alias moves."""

PREDICT_PATHS = (
    r"/v1/models/[^/]+/predict|/v1/variants/predict|/v2/models/[^/]+(/versions/[^/]+)?/infer"
)


class BodyLimits(NamedTuple):
    """Limits by path (regex, fully matched; the first match wins), and every other path's.
    GET, HEAD and OPTIONS bodies are not limited (nothing reads them)."""

    default: int
    limits: list[tuple[str, int]]

    @classmethod
    def of(cls, serve: ServeSettings) -> BodyLimits:
        """The limits these settings give."""
        return cls(
            ADMIN_BODY_BYTES,
            [
                (PREDICT_PATHS, serve.max_body_bytes),
                (r"/v1/models/[^/]+/feedback", serve.max_body_bytes),
                (r"/v1/models/[^/]+/versions", serve.max_import_bytes),
            ],
        )

    @classmethod
    def from_json(cls, raw: str) -> BodyLimits:
        """Parse :meth:`to_json`."""
        data = json.loads(raw)
        return cls(int(data["default"]), [(str(p), int(n)) for p, n in data["limits"]])

    def to_json(self) -> str:
        """JSON ``{"default": bytes, "limits": [[path regex, bytes], ...]}``."""
        return json.dumps({"default": self.default, "limits": [list(x) for x in self.limits]})

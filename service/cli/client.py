"""A small HTTP client of a running Refit service (the ``refit`` CLI's remote commands).

Standard library only. The URL and token come from ``REFIT_URL`` / ``REFIT_TOKEN`` or, when
unset, from ``connection.json`` of the data dir that ``refit up`` wrote.
"""

from __future__ import annotations

import base64
import json
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from urllib3 import encode_multipart_formdata

from service.settings import RefitSettings

TERMINAL = ("succeeded", "failed", "cancelled")


class ClientError(Exception):
    """An HTTP error answer (status and the service's JSON error) or no answer at all."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {json.dumps(body)}")
        self.status, self.body = status, body


@dataclass
class Client:
    """Bearer-authenticated JSON calls to one service."""

    url: str
    token: str | None
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ClientError(0, {"error": {"message": f"not an http(s) URL: {self.url!r}"}})

    @classmethod
    def configured(cls, settings: RefitSettings, data_dir: str | None) -> Client:
        """From settings (``REFIT_URL``, ``REFIT_TOKEN``), else ``data_dir/connection.json``."""
        conn: dict[str, Any] = {}
        path = Path(data_dir or ".refit") / "connection.json"
        if path.exists():
            conn = json.loads(path.read_text())
        url = settings.url or conn.get("url")
        if not url:
            raise ClientError(0, {"error": {"message": f"set REFIT_URL or run refit up ({path})"}})
        token = settings.token.get_secret_value() if settings.token else conn.get("admin_token")
        return cls(url.rstrip("/"), token)

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        headers: dict[str, str] | None = None,
        form: list[tuple[str, Any]] | None = None,
    ) -> Any:
        """One request; the parsed JSON answer; ClientError on >= 400. ``form``: a
        multipart body instead of JSON (``(name, value)`` or ``(name, (filename, bytes))``)."""
        data = json.dumps(body).encode() if body is not None else None
        content_type = "application/json"
        if form is not None:
            data, content_type = encode_multipart_formdata(form)
        # the scheme is checked in __post_init__: only http(s), never file: or custom ones
        req = urllib.request.Request(self.url + path, data=data, method=method)  # noqa: S310
        if data is not None:
            req.add_header("Content-Type", content_type)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:  # noqa: S310
                payload = resp.read()
        except urllib.error.HTTPError as exc:
            text = exc.read()
            try:
                detail = json.loads(text)
            except ValueError:
                detail = {"error": {"message": text.decode(errors="replace")}}
            raise ClientError(exc.code, detail) from None
        except (urllib.error.URLError, OSError) as exc:
            raise ClientError(0, {"error": {"message": f"{self.url}: {exc}"}}) from None
        return json.loads(payload)

    # --- commands -------------------------------------------------------------------------------
    def predict(self, model: str, images: list[Path], top_k: int = 5) -> Any:
        """Classify image files."""
        encoded = [base64.b64encode(p.read_bytes()).decode() for p in images]
        return self.call("POST", f"/v1/models/{model}/predict", {"images": encoded, "top_k": top_k})

    def import_weights(
        self, model: str, weights: Path, metadata: dict[str, Any], calibration: list[Path]
    ) -> Any:
        """Publish weights trained elsewhere (safetensors) as a version of ``model``."""
        form: list[tuple[str, Any]] = [
            ("metadata", json.dumps(metadata)),
            ("weights", (weights.name, weights.read_bytes())),
        ]
        form += [("calibration", (p.name, p.read_bytes())) for p in calibration]
        return self.call("POST", f"/v1/models/{model}/versions", form=form)

    def start_job(self, spec: Any, idempotency_key: str | None = None) -> Any:
        """Start a fine-tune job."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self.call("POST", "/v1/finetune-jobs", spec, headers=headers)

    def wait(self, job_id: str, *, out: TextIO | None = None, interval_s: float = 1.0) -> Any:
        """Poll a job until it ends, drawing a progress bar on ``out`` (stderr by default)."""
        out = out or sys.stderr  # looked up now: the caller may have replaced sys.stderr
        last = ""
        while True:
            job = self.call("GET", f"/v1/finetune-jobs/{job_id}")
            line = progress_line(job)
            if line != last:
                if out.isatty():
                    out.write("\r\033[K" + line)
                else:
                    out.write(line + "\n")
                out.flush()
                last = line
            if job["state"] in TERMINAL:
                if out.isatty():
                    out.write("\n")
                return job
            time.sleep(interval_s)


def progress_line(job: dict[str, Any], width: int = 24) -> str:
    """``[#####......] epoch 3/8 step 4/12 121 img/s eta 40s running`` for a job view."""
    p = job.get("progress") or {}
    epochs = p.get("epochs") or 0
    steps = p.get("steps_per_epoch") or 0
    done = float(p.get("epochs_done") or 0)
    if p.get("step") and steps:
        done = p["epoch"] - 1 + min(1.0, p["step"] / steps)
    if job["state"] == "succeeded":
        done = float(epochs or 1)
    frac = min(1.0, done / epochs) if epochs else 0.0
    bar = "#" * round(frac * width) + "." * (width - round(frac * width))
    parts = [f"[{bar}] {frac:4.0%}"]
    if epochs:
        parts.append(f"epoch {p.get('epoch', 0)}/{epochs}")
    if p.get("step") and steps:
        parts.append(f"step {p['step']}/{steps}")
    if p.get("images_per_s"):
        parts.append(f"{p['images_per_s']:.0f} img/s")
    if p.get("eta_s") is not None and job["state"] == "running":
        parts.append(f"eta {p['eta_s']:.0f}s")
    if "val_top1" in p.get("metrics", {}):
        parts.append(f"val top1 {p['metrics']['val_top1']:.3f}")
    parts.append(job["state"])
    return " ".join(parts)


__all__ = ["Client", "ClientError", "progress_line"]

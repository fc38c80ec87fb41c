"""The HTTP API: the only module that touches FastAPI.

Routes validate and authenticate, then call a :class:`Backend` (the Serve deployments provide
one). Every error - ours, FastAPI's validation, unknown routes - leaves as
``{"error": {"code", "message", "field"?}}`` through the one handler table at the bottom.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import time
from http import HTTPStatus
from typing import Any, Protocol

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import AuthError, BadRequestError, ForbiddenError, TooLargeError
from service.metrics import ScrapeCollector
from service.oip import build_response, parse_infer
from training.errors import NotFoundError, RefitError
from training.ids import is_id
from training.jobs import STATES
from training.settings import ServeSettings

log = logging.getLogger("refit.api")


class Jobs(Protocol):
    """What the job routes need (see :class:`service.jobs.JobsBackend`)."""

    async def create(
        self, spec: dict[str, Any], idempotency_key: str | None
    ) -> tuple[dict[str, Any], bool]:
        """Queue a job: its view, and False when an Idempotency-Key replayed an old one."""
        ...

    async def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a job."""
        ...

    async def get(self, job_id: str) -> dict[str, Any]:
        """One job with its progress."""
        ...

    async def list(self, *, limit: int, state: str | None) -> list[dict[str, Any]]:
        """Jobs, newest first."""
        ...

    async def curve(self, job_id: str) -> bytes:
        """The training curve (PNG)."""
        ...

    async def stats(self) -> dict[str, Any]:
        """Job counts by state and training throughput."""
        ...


class Backend(Protocol):
    """What the routes need from the serving side."""

    jobs: Jobs

    async def predict(self, model: str, images: list[bytes], top_k: int) -> dict[str, Any]:
        """Classify encoded images with the serving version of ``model``."""
        ...

    def list_models(self) -> list[dict[str, Any]]:
        """Published models and the version each alias points at."""
        ...

    def list_versions(self, model: str) -> dict[str, Any]:
        """Published versions of one model."""
        ...

    async def predict_tensor(self, model: str, x: Any, top_k: int) -> dict[str, Any]:
        """Classify an already preprocessed float32 batch."""
        ...

    def manifest(self, model: str) -> Any:
        """The manifest of the version that serves (NotFound / NoVersion otherwise)."""
        ...

    async def promote(self, model: str, version: str, alias: str) -> dict[str, Any]:
        """Point ``alias`` at ``version`` (verified); replicas follow."""
        ...

    async def rollback(self, model: str, alias: str) -> dict[str, Any]:
        """Move ``alias`` back one step; replicas follow."""
        ...

    async def ready(self) -> bool:
        """Whether the classifier deployment answers."""
        ...

    async def stats(self) -> dict[str, Any]:
        """A classifier replica's loaded models, swaps, failed loads and RSS."""
        ...


class PromoteRequest(BaseModel):
    """Point an alias at a published version."""

    model_config = ConfigDict(extra="forbid")

    version: str
    alias: str = "production"


class RollbackRequest(BaseModel):
    """Move an alias back to the version it held before."""

    model_config = ConfigDict(extra="forbid")

    alias: str = "production"


class PredictRequest(BaseModel):
    """JSON predict body: base64-encoded images."""

    model_config = ConfigDict(extra="forbid")

    images: list[str] = Field(min_length=1)
    top_k: int = Field(default=5, ge=1)


def _check_model(model: str) -> str:
    if not is_id(model):
        raise BadRequestError("not a valid model name", field="model")
    return model


def _check_job(job_id: str) -> str:
    if not is_id(job_id):
        raise BadRequestError("not a valid job id", field="job_id")
    return job_id


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str, secret: Any) -> bool:
    return secret is not None and hmac.compare_digest(
        token.encode(), secret.get_secret_value().encode()
    )


def check_predict_auth(request: Request, settings: ServeSettings) -> None:
    """Predict scope: open unless a predict token is set; the admin token also works."""
    if settings.predict_token is None:
        return
    token = _bearer(request)
    if token is None:
        raise AuthError("missing bearer token")
    if not (_matches(token, settings.predict_token) or _matches(token, settings.admin_token)):
        raise ForbiddenError("token not valid for predict")


def check_admin_auth(request: Request, settings: ServeSettings) -> None:
    """Admin scope: always needs the admin token (disabled when none is configured)."""
    if settings.admin_token is None:
        raise ForbiddenError("admin endpoints are disabled: no REFIT_SERVE__ADMIN_TOKEN is set")
    token = _bearer(request)
    if token is None:
        raise AuthError("missing bearer token")
    if not _matches(token, settings.admin_token):
        raise ForbiddenError("token not valid for admin endpoints")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 past ``limit`` - before parsing, and while streaming when
    the client sent no Content-Length."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLargeError(f"body of {declared} bytes exceeds {limit}", field="body")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLargeError(f"body exceeds {limit} bytes", field="body")
        chunks.append(chunk)
    return b"".join(chunks)


def _decode_b64(items: list[str]) -> list[bytes]:
    out = []
    for i, item in enumerate(items):
        try:
            out.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError):
            raise BadRequestError("not valid base64", field=f"images[{i}]") from None
    return out


async def _predict_inputs(request: Request, settings: ServeSettings) -> tuple[list[bytes], int]:
    body = await read_body(request, settings.max_body_bytes)
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        # Parse the already size-checked body (Starlette's parser, fed from memory).
        from starlette.datastructures import UploadFile
        from starlette.formparsers import MultiPartException, MultiPartParser

        async def stream() -> Any:
            yield body

        try:
            form = await MultiPartParser(
                request.headers, stream(), max_files=settings.max_images, max_fields=8
            ).parse()
        except MultiPartException as exc:  # malformed body, no boundary, too many parts
            raise BadRequestError(f"malformed multipart body: {exc}", field="body") from None
        images = []
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                images.append(await value.read())
            elif key != "top_k":
                raise BadRequestError("unexpected form field", field=key)
        raw_k = form.get("top_k")
        try:
            top_k = int(str(raw_k)) if raw_k is not None else 5
        except ValueError:
            raise BadRequestError("must be an integer", field="top_k") from None
        if not images:
            raise BadRequestError("no image files in the form", field="images")
    elif ctype.startswith("application/json") or not ctype:
        try:
            req = PredictRequest.model_validate_json(body)
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            field = ".".join(str(p) for p in err["loc"]) or "body"
            raise BadRequestError(err["msg"], field=field) from None
        images, top_k = _decode_b64(req.images), req.top_k
    else:
        raise BadRequestError("use application/json or multipart/form-data", field="content-type")
    if len(images) > settings.max_images:
        raise TooLargeError(f"{len(images)} images; at most {settings.max_images}", field="images")
    if not 1 <= top_k <= settings.max_top_k:
        raise BadRequestError(f"must be 1..{settings.max_top_k}", field="top_k")
    return images, top_k


class _Observe:
    """Counts requests by route template and status, and times them. Plain ASGI: Starlette's
    ``BaseHTTPMiddleware`` runs every request through an extra task group and stream, a
    measurable cost per request on two cores."""

    def __init__(self, app: Any, requests_total: Counter, latency: Histogram) -> None:
        self.app, self.requests_total, self.latency = app, requests_total, latency

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
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


def create_app() -> FastAPI:
    """The FastAPI application. Before serving, set ``app.state.backend`` (a Backend) and
    ``app.state.settings`` (ServeSettings): handlers read both per request."""
    app = FastAPI(title="Refit", version="0.1.0")
    metrics = CollectorRegistry()
    requests_total = Counter(
        "refit_http_requests_total", "HTTP requests", ["route", "status"], registry=metrics
    )
    latency = Histogram(
        "refit_http_request_seconds",
        "HTTP latency",
        ["route"],
        registry=metrics,
        buckets=(0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 5),
    )
    app.state.metrics = metrics
    scraped = ScrapeCollector()
    metrics.register(scraped)

    app.add_middleware(_Observe, requests_total=requests_total, latency=latency)

    def backend(request: Request) -> Backend:
        b: Backend = request.app.state.backend
        return b

    def conf(request: Request) -> ServeSettings:
        s: ServeSettings = request.app.state.settings
        return s

    @app.post("/v1/models/{model}/predict")
    async def predict(model: str, request: Request) -> JSONResponse:
        _check_model(model)
        check_predict_auth(request, conf(request))
        images, top_k = await _predict_inputs(request, conf(request))
        result = await backend(request).predict(model, images, top_k)
        return JSONResponse(result, headers={"X-Model-Version": result["model_version"]})

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        check_predict_auth(request, conf(request))
        return {"models": backend(request).list_models()}

    @app.get("/v1/models/{model}/versions")
    async def list_versions(model: str, request: Request) -> dict[str, Any]:
        _check_model(model)
        check_predict_auth(request, conf(request))
        return backend(request).list_versions(model)

    # --- admin: move aliases ------------------------------------------------------------------
    async def _admin_body(request: Request, model_cls: type[BaseModel]) -> Any:
        check_admin_auth(request, conf(request))
        body = await read_body(request, 64 * 1024)
        try:
            parsed = model_cls.model_validate_json(body or b"{}")
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            raise BadRequestError(
                err["msg"], field=".".join(str(p) for p in err["loc"]) or "body"
            ) from None
        for name in ("version", "alias"):
            value = getattr(parsed, name, None)
            if value is not None and not is_id(value):
                raise BadRequestError("not a valid id", field=name)
        return parsed

    @app.post("/v1/models/{model}/promote")
    async def promote(model: str, request: Request) -> dict[str, Any]:
        _check_model(model)
        req = await _admin_body(request, PromoteRequest)
        return await backend(request).promote(model, req.version, req.alias)

    @app.post("/v1/models/{model}/rollback")
    async def rollback(model: str, request: Request) -> dict[str, Any]:
        _check_model(model)
        req = await _admin_body(request, RollbackRequest)
        return await backend(request).rollback(model, req.alias)

    # --- admin: fine-tune jobs ---------------------------------------------------------------
    @app.post("/v1/finetune-jobs", status_code=202)
    async def create_job(request: Request) -> JSONResponse:
        check_admin_auth(request, conf(request))
        body = await read_body(request, 1024 * 1024)
        try:
            spec = json.loads(body or b"null")
        except ValueError:
            raise BadRequestError("body is not JSON", field="body") from None
        if not isinstance(spec, dict):
            raise BadRequestError("body must be a JSON object (the fine-tune spec)", field="body")
        key = request.headers.get("idempotency-key")
        if key is not None and not 1 <= len(key) <= 255:
            raise BadRequestError("must be 1-255 characters", field="Idempotency-Key")
        job, created = await backend(request).jobs.create(spec, key)
        headers = {"Location": job["links"]["self"]}
        if not created:
            headers["Idempotent-Replayed"] = "true"
        return JSONResponse(job, status_code=202 if created else 200, headers=headers)

    @app.get("/v1/finetune-jobs")
    async def list_jobs(
        request: Request, state: str | None = None, limit: int = 50
    ) -> dict[str, Any]:
        check_admin_auth(request, conf(request))
        if state is not None and state not in STATES:
            raise BadRequestError(f"must be one of {', '.join(STATES)}", field="state")
        if not 1 <= limit <= 500:
            raise BadRequestError("must be 1..500", field="limit")
        return {"jobs": await backend(request).jobs.list(limit=limit, state=state)}

    @app.get("/v1/finetune-jobs/{job_id}")
    async def get_job(job_id: str, request: Request) -> dict[str, Any]:
        check_admin_auth(request, conf(request))
        return await backend(request).jobs.get(_check_job(job_id))

    @app.get("/v1/finetune-jobs/{job_id}/curve.png")
    async def job_curve(job_id: str, request: Request) -> Response:
        check_admin_auth(request, conf(request))
        png = await backend(request).jobs.curve(_check_job(job_id))
        return Response(png, media_type="image/png")

    @app.post("/v1/finetune-jobs/{job_id}/cancel", status_code=202)
    async def cancel_job(job_id: str, request: Request) -> dict[str, Any]:
        check_admin_auth(request, conf(request))
        return await backend(request).jobs.cancel(_check_job(job_id))

    # --- Open Inference Protocol v2 ------------------------------------------------------------
    @app.get("/v2/health/live")
    async def v2_live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def v2_ready(request: Request) -> JSONResponse:
        ok = await backend(request).ready()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/v2/models/{model}")
    async def v2_metadata(model: str, request: Request) -> dict[str, Any]:
        _check_model(model)
        check_predict_auth(request, conf(request))
        m = backend(request).manifest(model)
        size = m.preprocessing.crop_size
        return {
            "name": model,
            "versions": [m.version],
            "platform": f"pytorch_torchvision_{m.backbone}",
            "inputs": [
                {"name": "images", "datatype": "BYTES", "shape": [-1]},
                {"name": "input", "datatype": "FP32", "shape": [-1, 3, size, size]},
            ],
            "outputs": [
                {"name": "labels", "datatype": "BYTES", "shape": [-1, -1]},
                {"name": "scores", "datatype": "FP32", "shape": [-1, -1]},
            ],
            "parameters": {"class_names": m.class_names},
        }

    @app.get("/v2/models/{model}/ready")
    async def v2_model_ready(model: str, request: Request) -> JSONResponse:
        _check_model(model)
        check_predict_auth(request, conf(request))
        try:
            backend(request).manifest(model)
            ready = True
        except RefitError as exc:
            if exc.status == HTTPStatus.NOT_FOUND:
                raise
            ready = False
        return JSONResponse({"name": model, "ready": ready}, status_code=200 if ready else 503)

    @app.post("/v2/models/{model}/infer")
    async def v2_infer(model: str, request: Request) -> Response:
        return await _infer(model, None, request)

    @app.post("/v2/models/{model}/versions/{version}/infer")
    async def v2_infer_version(model: str, version: str, request: Request) -> Response:
        return await _infer(model, version, request)

    async def _infer(model: str, version: str | None, request: Request) -> Response:
        _check_model(model)
        settings = conf(request)
        check_predict_auth(request, settings)
        body = await read_body(request, settings.max_body_bytes)
        raw_len = request.headers.get("inference-header-content-length")
        if raw_len is not None and not raw_len.isdigit():
            raise BadRequestError("must be an integer", field="Inference-Header-Content-Length")
        req = parse_infer(body, int(raw_len) if raw_len else None, max_images=settings.max_images)
        top_k = min(req.top_k or 5, settings.max_top_k)
        b = backend(request)
        if req.images is not None:
            result = await b.predict(model, req.images, top_k)
        else:
            result = await b.predict_tensor(model, req.tensor, top_k)
        if version is not None and version != result["model_version"]:
            raise NotFoundError(
                f"version {version!r} is not served; {result['model_version']} is",
                field="version",
            )
        content, headers, media = build_response(result, req)
        return Response(content, headers=headers, media_type=media)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        ok = await backend(request).ready()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        b = backend(request)
        # metrics must answer even when the classifier or the job runner does not
        try:
            scraped.classifier = await b.stats()
        except Exception:
            scraped.classifier = {}
        try:
            scraped.jobs = await b.jobs.stats()
        except Exception:
            scraped.jobs = {}
        return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)

    # --- the one error table -----------------------------------------------------------------
    @app.exception_handler(RefitError)
    async def refit_error(_: Request, exc: RefitError) -> JSONResponse:
        retry = {HTTPStatus.SERVICE_UNAVAILABLE: "1", HTTPStatus.TOO_MANY_REQUESTS: "30"}
        headers = {"Retry-After": retry[exc.status]} if exc.status in retry else None
        return JSONResponse(exc.to_dict(), status_code=int(exc.status), headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"][1:]) or "request"
        return JSONResponse(BadRequestError(err["msg"], field=field).to_dict(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        body = {"error": {"code": code, "message": str(exc.detail)}}
        return JSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
        body = {"error": {"code": "internal_error", "message": type(exc).__name__}}
        return JSONResponse(body, status_code=500)

    return app

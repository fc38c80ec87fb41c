"""The one error table: every exception that leaves a route becomes
``{"error": {"code", "message", "field"?}}`` here, and nowhere else (the shape of MLServer's
``rest/errors.py``). :data:`EXCEPTION_HANDLERS` is what ``FastAPI(exception_handlers=...)``
takes; each :class:`RefitError` subclass carries its own status."""

from __future__ import annotations

import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.request_errors import AuthError, BadRequestError, bad_request, field_path
from training.storage.errors import RefitError

log = logging.getLogger("refit.api")

RETRY_AFTER_S = {HTTPStatus.SERVICE_UNAVAILABLE: "1", HTTPStatus.TOO_MANY_REQUESTS: "30"}
"""``Retry-After`` of the statuses a client should retry."""


class ErrorDetail(BaseModel):
    """What went wrong: a stable code, a message, and the offending field or item."""

    code: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    """Every error response's body."""

    error: ErrorDetail


def error_response(exc: RefitError) -> JSONResponse:
    """The response of one of our errors (its status, ``Retry-After`` where it applies)."""
    retry = RETRY_AFTER_S.get(exc.status)
    headers = {"Retry-After": retry} if retry else {}
    if isinstance(exc, AuthError):
        headers["WWW-Authenticate"] = exc.challenge
    return JSONResponse(exc.to_dict(), status_code=int(exc.status), headers=headers)


async def _refit_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RefitError)
    return error_response(exc)


async def _request_validation(_: Request, exc: Exception) -> JSONResponse:
    # FastAPI's locations start with where the value came from (path, query, header, body):
    # the client named the field itself, so that part goes.
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    err = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = tuple(err["loc"])[1:]
    return error_response(BadRequestError(str(err["msg"]), field=field_path(loc) or "body"))


async def _pydantic_validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ValidationError)
    return error_response(bad_request(exc))


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    body = {"error": {"code": code, "message": str(exc.detail)}}
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s", request.url.path, exc_info=exc)
    body = {"error": {"code": "internal_error", "message": type(exc).__name__}}
    return JSONResponse(body, status_code=500)


EXCEPTION_HANDLERS: dict[int | type[Exception], Callable[[Request, Any], Any]] = {
    RefitError: _refit_error,
    RequestValidationError: _request_validation,
    ValidationError: _pydantic_validation,
    StarletteHTTPException: _http_error,
    Exception: _internal_error,
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for error statuses, each with the one error body."""
    return {s: {"model": ErrorResponse, "description": HTTPStatus(s).phrase} for s in statuses}

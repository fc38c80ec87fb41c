"""Service-level errors: the same hierarchy as training's (each carries its HTTP status)."""

from __future__ import annotations

from http import HTTPStatus

from pydantic import ValidationError

from training.storage.errors import RefitError


class BadRequestError(RefitError):
    """A malformed request body or field."""

    status = HTTPStatus.BAD_REQUEST
    code = "bad_request"


class InvalidImageError(RefitError):
    """An image in the request cannot be decoded (corrupt or truncated)."""

    status = HTTPStatus.UNPROCESSABLE_ENTITY
    code = "invalid_image"


class UnsupportedImageError(RefitError):
    """An image format other than JPEG, PNG or WebP."""

    status = HTTPStatus.UNSUPPORTED_MEDIA_TYPE
    code = "unsupported_image"


class UnsupportedMediaTypeError(RefitError):
    """A body whose ``Content-Type`` the route does not take."""

    status = HTTPStatus.UNSUPPORTED_MEDIA_TYPE
    code = "unsupported_media_type"


class TooLargeError(RefitError):
    """A body, image or pixel count over its cap (decompression bombs included)."""

    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    code = "too_large"


class NoVersionError(RefitError):
    """The model exists but has no version to serve yet."""

    status = HTTPStatus.SERVICE_UNAVAILABLE
    code = "no_version"


class AuthError(RefitError):
    """No credentials (RFC 6750: 401 with a ``Bearer`` challenge)."""

    status = HTTPStatus.UNAUTHORIZED
    code = "unauthorized"
    challenge = "Bearer"
    """The ``WWW-Authenticate`` value of the response."""


class InvalidTokenError(AuthError):
    """A bearer token that is malformed or not one of ours (RFC 6750 ``invalid_token``)."""

    code = "invalid_token"
    challenge = 'Bearer error="invalid_token"'


class HeadersTooLargeError(RefitError):
    """Request headers over their count or size limits."""

    status = HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
    code = "headers_too_large"


class ForbiddenError(RefitError):
    """Credentials valid for another scope (or admin endpoints disabled)."""

    status = HTTPStatus.FORBIDDEN
    code = "forbidden"


class OverloadedError(RefitError):
    """Queues are full (``max_queued_requests``): retry after a moment."""

    status = HTTPStatus.SERVICE_UNAVAILABLE
    code = "overloaded"


def field_path(loc: tuple[int | str, ...] | list[int | str]) -> str:
    """A pydantic error location as the field a client wrote: ``inputs[0].shape``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def bad_request(exc: ValidationError, *, prefix: tuple[str, ...] = ()) -> BadRequestError:
    """The first error of a pydantic validation as a 400 naming its field (the one way a
    validation error becomes ``{"error": {"code", "message", "field"}}``)."""
    errors = exc.errors(include_url=False)
    if not errors:
        return BadRequestError(str(exc), field="body")
    err = errors[0]
    loc = tuple(err["loc"])
    return BadRequestError(err["msg"], field=field_path(prefix + loc) or "body")


class ReplicaUnavailableError(RefitError):
    """The replica or actor that was to answer died or is restarting: retry shortly."""

    status = HTTPStatus.SERVICE_UNAVAILABLE
    code = "unavailable"


def unwrap_remote(exc: Exception) -> Exception:
    """An exception that crossed a Ray boundary, as the one error table should see it: our
    own error raised inside a Ray actor or replica (a ``RayTaskError`` keeps it as
    ``cause``) as the class it was raised as; a dead or restarting actor (``RayActorError``)
    as a 503 to retry; anything else as itself (a bug: 500)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, RefitError):
        return cause
    # only callers that crossed a Ray boundary get here, so Ray is importable
    from ray.exceptions import RayActorError

    if isinstance(exc, RayActorError):
        return ReplicaUnavailableError(f"the serving process is unavailable: {type(exc).__name__}")
    return exc

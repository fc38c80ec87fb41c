"""Auth as declared FastAPI dependencies: two bearer schemes, one per scope, so every route's
scope shows in its signature and in ``/openapi.json``.

* predict scope: open unless ``REFIT_SERVE__PREDICT_TOKEN`` is set; the admin token works too;
* admin scope: always needs ``REFIT_SERVE__ADMIN_TOKEN`` (disabled when none is set);
* label scope (``POST /v1/models/{model}/feedback``): ``REFIT_SERVE__LABEL_TOKEN`` (a
  labelling client's, which opens nothing else) or the admin token; disabled when neither is set;
* metrics scope (``/metrics``: model names, versions, job counts): ``REFIT_SERVE__METRICS_TOKEN``
  (the scraper's, which opens nothing else) or the admin token; disabled when neither is set.

RFC 6750: no token, or one that is none of ours, is 401 with a ``WWW-Authenticate`` challenge;
403 is for a valid token of the wrong scope (the predict token on an admin route).
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from service.request_errors import AuthError, ForbiddenError, InvalidTokenError
from service.settings import ServeSettings

predict_bearer = HTTPBearer(
    scheme_name="predictToken",
    description="REFIT_SERVE__PREDICT_TOKEN (or the admin token); open when none is set",
    auto_error=False,
)
admin_bearer = HTTPBearer(
    scheme_name="adminToken", description="REFIT_SERVE__ADMIN_TOKEN", auto_error=False
)

label_bearer = HTTPBearer(
    scheme_name="labelToken",
    description="REFIT_SERVE__LABEL_TOKEN (or the admin token)",
    auto_error=False,
)

metrics_bearer = HTTPBearer(
    scheme_name="metricsToken",
    description="REFIT_SERVE__METRICS_TOKEN (or the admin token)",
    auto_error=False,
)

Credentials = HTTPAuthorizationCredentials | None

# Every dependency here is ``async def`` though none awaits: FastAPI runs a plain ``def``
# dependency in AnyIO's worker threads, one thread hand-off per dependency per request
# (measured: 10-15 % of a replica's CPU at 32 concurrent predicts), and these only compare
# strings.


async def serve_settings(request: Request) -> ServeSettings:
    """The settings the app was created with."""
    settings: ServeSettings = request.app.state.settings
    return settings


Settings = Annotated[ServeSettings, Depends(serve_settings)]


def _matches(token: str, secret: SecretStr | None) -> bool:
    return secret is not None and hmac.compare_digest(
        token.encode(), secret.get_secret_value().encode()
    )


def _token(credentials: Credentials) -> str:
    if credentials is None or not credentials.credentials.strip():
        raise AuthError("missing bearer token")
    return credentials.credentials.strip()


async def require_predict(
    settings: Settings, credentials: Annotated[Credentials, Security(predict_bearer)]
) -> None:
    """Predict scope."""
    if settings.predict_token is None:
        return
    token = _token(credentials)
    if not (_matches(token, settings.predict_token) or _matches(token, settings.admin_token)):
        raise InvalidTokenError("not a valid token")


async def require_admin(
    settings: Settings, credentials: Annotated[Credentials, Security(admin_bearer)]
) -> None:
    """Admin scope."""
    if settings.admin_token is None:
        raise ForbiddenError("admin endpoints are disabled: no REFIT_SERVE__ADMIN_TOKEN is set")
    token = _token(credentials)
    if _matches(token, settings.predict_token) or _matches(token, settings.label_token):
        raise ForbiddenError("only the admin token is valid for admin endpoints")
    if not _matches(token, settings.admin_token):
        raise InvalidTokenError("not a valid token")


async def require_metrics(
    settings: Settings, credentials: Annotated[Credentials, Security(metrics_bearer)]
) -> None:
    """Metrics scope: what a scrape shows is for operators, not for every client."""
    if settings.metrics_token is None and settings.admin_token is None:
        raise ForbiddenError(
            "metrics are disabled: set REFIT_SERVE__METRICS_TOKEN (or an admin token)"
        )
    token = _token(credentials)
    if _matches(token, settings.predict_token):
        raise ForbiddenError("the predict token is not valid for /metrics")
    if not (_matches(token, settings.metrics_token) or _matches(token, settings.admin_token)):
        raise InvalidTokenError("not a valid token")


async def require_label(
    settings: Settings, credentials: Annotated[Credentials, Security(label_bearer)]
) -> None:
    """Label scope: a labelling client sends labels back, and can do nothing else."""
    if settings.label_token is None and settings.admin_token is None:
        raise ForbiddenError(
            "feedback is disabled: set REFIT_SERVE__LABEL_TOKEN (or an admin token)"
        )
    token = _token(credentials)
    if _matches(token, settings.predict_token) or _matches(token, settings.metrics_token):
        raise ForbiddenError("only the label or admin token is valid for feedback")
    if not (_matches(token, settings.label_token) or _matches(token, settings.admin_token)):
        raise InvalidTokenError("not a valid token")


PredictScope = Depends(require_predict)
LabelScope = Depends(require_label)
MetricsScope = Depends(require_metrics)
AdminScope = Depends(require_admin)

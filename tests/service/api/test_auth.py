"""Token checks without a server: scopes, constant-time comparison inputs, disabled admin."""

from __future__ import annotations

import pytest
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import SecretStr

from service.api.auth import require_admin, require_metrics, require_predict
from service.request_errors import AuthError, ForbiddenError, InvalidTokenError
from service.settings import ServeSettings


def _req(token: str | None) -> HTTPAuthorizationCredentials | None:
    # what the declared bearer scheme hands the dependency (None: no Authorization header)
    return HTTPAuthorizationCredentials(scheme="Bearer", credentials=token) if token else None


def test_predict_open_unless_token_set() -> None:
    require_predict(ServeSettings(), _req(None))
    s = ServeSettings(predict_token=SecretStr("p"), admin_token=SecretStr("a"))
    require_predict(s, _req("p"))
    require_predict(s, _req("a"))
    with pytest.raises(AuthError):
        require_predict(s, _req(None))
    with pytest.raises(InvalidTokenError):
        require_predict(s, _req("x"))


def test_admin_scope_and_disabled() -> None:
    with pytest.raises(ForbiddenError, match="disabled"):
        require_admin(ServeSettings(), _req("anything"))
    s = ServeSettings(predict_token=SecretStr("p"), admin_token=SecretStr("a"))
    require_admin(s, _req("a"))
    with pytest.raises(AuthError):
        require_admin(s, _req(None))
    with pytest.raises(ForbiddenError):  # a valid token of the other scope
        require_admin(s, _req("p"))
    with pytest.raises(InvalidTokenError):
        require_admin(s, _req("x"))


def test_metrics_need_the_scrape_or_admin_token() -> None:
    with pytest.raises(ForbiddenError, match="disabled"):  # no token configured: closed
        require_metrics(ServeSettings(), _req(None))
    s = ServeSettings(
        predict_token=SecretStr("p"), admin_token=SecretStr("a"), metrics_token=SecretStr("m")
    )
    require_metrics(s, _req("m"))
    require_metrics(s, _req("a"))
    with pytest.raises(AuthError):
        require_metrics(s, _req(None))
    with pytest.raises(ForbiddenError):
        require_metrics(s, _req("p"))
    with pytest.raises(InvalidTokenError):
        require_metrics(s, _req("x"))
    require_metrics(ServeSettings(admin_token=SecretStr("a")), _req("a"))

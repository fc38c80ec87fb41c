"""Token checks without a server: scopes, constant-time comparison inputs, disabled admin."""

from __future__ import annotations

import pytest
from pydantic import SecretStr
from starlette.requests import Request

from service.api import check_admin_auth, check_predict_auth
from service.errors import AuthError, ForbiddenError
from training.settings import ServeSettings


def _req(token: str | None) -> Request:
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    return Request({"type": "http", "headers": headers})


def test_predict_open_unless_token_set() -> None:
    check_predict_auth(_req(None), ServeSettings())
    s = ServeSettings(predict_token=SecretStr("p"), admin_token=SecretStr("a"))
    check_predict_auth(_req("p"), s)
    check_predict_auth(_req("a"), s)
    with pytest.raises(AuthError):
        check_predict_auth(_req(None), s)
    with pytest.raises(ForbiddenError):
        check_predict_auth(_req("x"), s)


def test_admin_scope_and_disabled() -> None:
    with pytest.raises(ForbiddenError, match="disabled"):
        check_admin_auth(_req("anything"), ServeSettings())
    s = ServeSettings(predict_token=SecretStr("p"), admin_token=SecretStr("a"))
    check_admin_auth(_req("a"), s)
    with pytest.raises(AuthError):
        check_admin_auth(_req(None), s)
    with pytest.raises(ForbiddenError):
        check_admin_auth(_req("p"), s)

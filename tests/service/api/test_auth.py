"""Token checks without a server: scopes, constant-time comparison inputs, disabled admin."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import SecretStr

from service.api.auth import require_admin, require_metrics, require_predict
from service.request_errors import AuthError, ForbiddenError, InvalidTokenError
from service.settings import ServeSettings


def _check(dependency: Any, settings: ServeSettings, credentials: Any) -> None:
    asyncio.run(dependency(settings, credentials))


def _req(token: str | None) -> HTTPAuthorizationCredentials | None:
    # what the declared bearer scheme hands the dependency (None: no Authorization header)
    return HTTPAuthorizationCredentials(scheme="Bearer", credentials=token) if token else None


def test_predict_open_unless_token_set() -> None:
    _check(require_predict, ServeSettings(), _req(None))
    s = ServeSettings(predict_token=SecretStr("p"), admin_token=SecretStr("a"))
    _check(require_predict, s, _req("p"))
    _check(require_predict, s, _req("a"))
    with pytest.raises(AuthError):
        _check(require_predict, s, _req(None))
    with pytest.raises(InvalidTokenError):
        _check(require_predict, s, _req("x"))


def test_admin_scope_and_disabled() -> None:
    with pytest.raises(ForbiddenError, match="disabled"):
        _check(require_admin, ServeSettings(), _req("anything"))
    s = ServeSettings(predict_token=SecretStr("p"), admin_token=SecretStr("a"))
    _check(require_admin, s, _req("a"))
    with pytest.raises(AuthError):
        _check(require_admin, s, _req(None))
    with pytest.raises(ForbiddenError):  # a valid token of the other scope
        _check(require_admin, s, _req("p"))
    with pytest.raises(InvalidTokenError):
        _check(require_admin, s, _req("x"))


def test_metrics_need_the_scrape_or_admin_token() -> None:
    with pytest.raises(ForbiddenError, match="disabled"):  # no token configured: closed
        _check(require_metrics, ServeSettings(), _req(None))
    s = ServeSettings(
        predict_token=SecretStr("p"), admin_token=SecretStr("a"), metrics_token=SecretStr("m")
    )
    _check(require_metrics, s, _req("m"))
    _check(require_metrics, s, _req("a"))
    with pytest.raises(AuthError):
        _check(require_metrics, s, _req(None))
    with pytest.raises(ForbiddenError):
        _check(require_metrics, s, _req("p"))
    with pytest.raises(InvalidTokenError):
        _check(require_metrics, s, _req("x"))
    _check(require_metrics, ServeSettings(admin_token=SecretStr("a")), _req("a"))


def test_auth_and_settings_run_on_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """FastAPI runs a plain ``def`` dependency in AnyIO's worker threads, a hand-off per
    dependency per request (10-15 % of a replica's CPU at 32 concurrent predicts when auth,
    settings and the data plane were plain functions): a request whose dependencies all ran
    hands nothing to a thread."""
    import anyio.to_thread
    import httpx

    from service.api import create_app
    from service.settings import RefitSettings

    handed: list[str] = []
    real = anyio.to_thread.run_sync

    async def counting(func: Any, *args: Any, **kwargs: Any) -> Any:
        handed.append(getattr(func, "__name__", repr(func)))
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counting)
    settings = RefitSettings.model_validate({"serve": {"predict_token": "p", "admin_token": "a"}})
    app = create_app(settings, None)  # type: ignore[arg-type]  # refused before the plane

    async def calls() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            predict = await client.post(  # auth, settings, the plane solved; then a 400
                "/v1/models/m/predict",
                content=b"x",
                headers={"Authorization": "Bearer p", "Content-Type": "text/plain"},
            )
            admin = await client.get(  # the admin scope refuses the predict token
                "/v1/finetune-jobs", headers={"Authorization": "Bearer p"}
            )
            return [predict, admin]

    predict, admin = asyncio.run(calls())
    assert predict.status_code == 400, predict.text
    assert predict.json()["error"]["field"] == "content-type"
    assert admin.status_code == 403, admin.text
    assert handed == []

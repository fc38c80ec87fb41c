"""``refit capture``, ``refit feedback`` and ``refit quality`` against the API over real HTTP
(uvicorn on a free port, the in-process data plane on a real SeaweedFS)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import uvicorn
from pydantic import SecretStr

from api_app import ADMIN, PREDICT, build_inprocess_app
from conftest import free_port, png_bytes
from service.cli.client import ClientError
from service.cli.main import build_parser
from service.settings import RefitSettings


@pytest.fixture
def server(settings: RefitSettings) -> Iterator[tuple[str, dict[str, Any]]]:
    app, parts = build_inprocess_app(settings, publish=True)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", parts
    finally:
        srv.should_exit = True
        thread.join(10)
        parts["close"]()


def _run(url: str, *argv: str) -> int:
    args = build_parser().parse_args(list(argv))
    return int(args.func(args, RefitSettings(url=url, token=SecretStr(ADMIN))))


def test_the_loop_from_the_command_line(
    server: tuple[str, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, parts = server
    assert (
        _run(url, "capture", "--model", "digits", "--rate", "1", "--max-per-class-per-hour", "0")
        == 0
    )
    shown = json.loads(capsys.readouterr().out)
    assert shown["policy"]["rate"] == 1.0
    assert shown["policy"]["max_per_class_per_hour"] is None
    tap = parts["plane"].predictor.host.capture
    tap.policy("digits")
    assert tap.flush()
    import base64

    body = {"images": [base64.b64encode(png_bytes(1)).decode()]}
    auth = {"Authorization": f"Bearer {PREDICT}"}
    pid = requests.post(
        f"{url}/v1/models/digits/predict", json=body, headers=auth, timeout=30
    ).json()["prediction_id"]
    assert tap.flush()
    assert _run(url, "capture", "--model", "digits", "--list") == 0
    assert json.loads(capsys.readouterr().out)["captures"] == [{"prediction_id": pid, "index": 0}]
    assert _run(url, "feedback", "--model", "digits", "--label", "b", "--prediction-id", pid) == 0
    assert "[1/1]" in capsys.readouterr().out
    image = tmp_path / "x.png"
    image.write_bytes(png_bytes(2, seed=4))
    assert _run(url, "feedback", "--model", "digits", "--label", "c", str(image)) == 0
    capsys.readouterr()
    assert _run(url, "feedback", "--model", "digits") == 0
    assert json.loads(capsys.readouterr().out)["labels"] == 2
    assert _run(url, "quality", "--model", "digits") == 0
    assert json.loads(capsys.readouterr().out)["labels"] == 1
    assert _run(url, "capture", "--model", "digits", "--off") == 0
    assert json.loads(capsys.readouterr().out)["enabled"] is False
    assert _run(url, "policy", "--model", "digits", "--every-n-labels", "50") == 0
    assert json.loads(capsys.readouterr().out)["policy"]["every_n_labels"] == 50
    assert _run(url, "policy", "--model", "digits", "--cooldown-s", "900") == 0
    policy = json.loads(capsys.readouterr().out)["policy"]
    assert (policy["every_n_labels"], policy["cooldown_s"]) == (50, 900)  # merged
    args = ("--drift-above", "0.3", "--drift-samples", "400")
    assert _run(url, "policy", "--model", "digits", *args) == 0
    policy = json.loads(capsys.readouterr().out)["policy"]
    assert (policy["drift_above"], policy["drift_samples"], policy["every_n_labels"]) == (
        0.3,
        400,
        50,
    )
    assert _run(url, "policy", "--model", "digits", "--freeze", "head_only") == 0
    freeze = json.loads(capsys.readouterr().out)["policy"]["freeze"]
    assert freeze == {"policy": "head_only", "feature_cache": True}
    assert (
        _run(url, "policy", "--model", "digits", "--freeze", '{"policy": "last_n_stages", "n": 2}')
        == 0
    )
    assert json.loads(capsys.readouterr().out)["policy"]["freeze"]["n"] == 2
    with pytest.raises(ClientError) as unknown:
        _run(url, "policy", "--model", "digits", "--freeze", "most")
    assert unknown.value.status == 400
    with pytest.raises(ClientError) as refused:  # a cooldown that could retrain in a loop
        _run(url, "policy", "--model", "digits", "--cooldown-s", "5")
    assert refused.value.status == 400
    assert _run(url, "policy", "--model", "digits", "--delete") == 0
    assert json.loads(capsys.readouterr().out)["policy"] is None

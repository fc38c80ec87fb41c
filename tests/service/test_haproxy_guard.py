"""``refit-haproxy`` narrows the config Ray renders from its own HAProxy template."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from service.body_limits import BodyLimits
from service.haproxy_guard import MARK, UnknownConfigError, narrow, real_haproxy

LIMITS = BodyLimits(1000, [(r"/v1/models/[^/]+/predict|/v2/models/[^/]+/infer", 5000)])


def ray_config(directory: Path) -> str:
    """The HAProxy config Ray 2.60 writes (Ray's own renderer, in ``directory``)."""
    from ray.serve._private.haproxy import HAProxyApi, HAProxyConfig
    from ray.serve.config import HTTPOptions

    cfg = HAProxyConfig(
        http_options=HTTPOptions(host="0.0.0.0", port=8000),
        socket_path=str(directory / "admin.sock"),
        server_state_base=str(directory),
        server_state_file=str(directory / "server-state"),
        metrics_socket_path=str(directory / "metrics.sock"),
        stats_port=8404,
        metrics_port=9101,
    )
    api = HAProxyApi(cfg=cfg, config_file_path=str(directory / "haproxy.cfg"))
    api._generate_config_file_internal()
    return (directory / "haproxy.cfg").read_text()


def test_ray_template_as_rendered_opens_the_side_doors(tmp_path: Path) -> None:
    """What the guard exists for (fails when Ray's template changes: recheck the guard)."""
    text = ray_config(tmp_path)
    assert re.search(r"stats socket \S+ mode 666 level admin", text)
    assert re.search(r"^\s*bind :9101$", text, re.M)
    assert re.search(r"^\s*bind \*:8404$", text, re.M)


def test_narrowed_config_binds_side_ports_to_one_address_and_closes_the_socket(
    tmp_path: Path,
) -> None:
    text = narrow(ray_config(tmp_path), side_host="127.0.0.1", body_limits=LIMITS)
    assert text.startswith(MARK)
    assert "mode 666" not in text
    assert re.search(rf"stats socket {tmp_path}/admin.sock mode 600 level admin", text)
    binds = re.findall(r"^\s*bind (\S+)", text, re.M)
    assert sorted(binds) == ["*:8000", "127.0.0.1:8404", "127.0.0.1:9101"]
    frontend = text.split("frontend http_frontend", 1)[1]
    assert "set-header Connection close if { status 413 } || { status 431 }" in frontend
    assert "path_reg ^(/v1/models/[^/]+/predict|/v2/models/[^/]+/infer)$" in frontend
    assert "if !refit_unlimited refit_body_0 { req.hdr_val(content-length) gt 5000 }" in frontend
    assert "!refit_body_0 { req.hdr_val(content-length) gt 1000 }" in frontend
    # idempotent: a config narrowed before is left as it is
    assert narrow(text, side_host="0.0.0.0") == text


def test_empty_side_host_removes_the_stats_page_and_the_exporter(tmp_path: Path) -> None:
    text = narrow(ray_config(tmp_path), side_host="")
    assert "listen stats" not in text
    assert "prometheus-exporter" not in text
    assert re.findall(r"^\s*bind (\S+)", text, re.M) == ["*:8000"]


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("mode 666", "mode 660"),  # the socket line changed
        ("listen stats", "listen statistics"),  # a side section renamed
        ("bind *:8404", "bind *:8404\n  bind *:8405"),  # a second bind
    ],
)
def test_an_unknown_config_is_refused(tmp_path: Path, old: str, new: str) -> None:
    """A template this program does not know: HAProxy does not start rather than start open."""
    with pytest.raises(UnknownConfigError):
        narrow(ray_config(tmp_path).replace(old, new), side_host="127.0.0.1")


def test_haproxy_accepts_the_narrowed_config(tmp_path: Path) -> None:
    """The real HAProxy parses what the guard writes (``haproxy -c``, nothing binds)."""
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(narrow(ray_config(tmp_path), side_host="127.0.0.1", body_limits=LIMITS))
    done = subprocess.run(
        [real_haproxy(), "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ALERT" not in done.stdout + done.stderr


def test_a_body_limit_path_haproxy_would_split_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnknownConfigError):
        narrow(
            ray_config(tmp_path),
            side_host="127.0.0.1",
            body_limits=BodyLimits(1, [("/a b", 2)]),
        )

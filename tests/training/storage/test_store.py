"""ObjectStore and the embedded SeaweedFS, against a real SeaweedFS."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from boto3.s3.transfer import TransferConfig

from service.embedded_store import Connection
from training.storage.errors import ConflictError, NotFoundError, SpecError
from training.storage.s3 import ObjectStore


def test_roundtrip_and_listing(store: ObjectStore) -> None:
    store.put_json("a/x.json", {"v": 1})
    store.put_bytes("a/y.bin", b"abc")
    assert store.get_json("a/x.json") == {"v": 1}
    assert [o.key for o in store.list("a/")] == ["a/x.json", "a/y.bin"]
    assert store.head("a/y.bin").size == 3
    assert store.head("a/missing") is None
    with pytest.raises(NotFoundError):
        store.get_bytes("a/missing")
    with pytest.raises(ValueError, match="exceeds"):
        store.get_bytes("a/y.bin", max_bytes=2)


def test_conditional_writes(store: ObjectStore) -> None:
    etag = store.put_bytes("k", b"1", if_none_match=True)
    with pytest.raises(ConflictError):
        store.put_bytes("k", b"2", if_none_match=True)
    with pytest.raises(ConflictError):
        store.put_bytes("k", b"3", if_match='"0000"')
    store.put_bytes("k", b"4", if_match=etag)
    assert store.get_bytes("k") == b"4"


def test_multipart_upload_works(store: ObjectStore) -> None:
    # Without the identities config SeaweedFS refuses multipart uploads.
    data = os.urandom(12 * 1024 * 1024)
    store.client.upload_fileobj(
        io.BytesIO(data),
        store.bucket,
        store.full_key("big.bin"),
        Config=TransferConfig(multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20),
    )
    assert store.get_bytes("big.bin") == data


@pytest.mark.parametrize(
    "uri",
    [
        "s3://refit/../etc/passwd",
        "s3://other-bucket/datasets/x/",
        "file:///etc/passwd",
        "http://169.254.169.254/latest",
        "s3://refit/PFX/datasets//x",
        "s3://refit/PFX/datasets/x y/",
    ],
)
def test_uri_allow_list(store: ObjectStore, uri: str) -> None:
    with pytest.raises(SpecError) as err:
        store.key_from_uri(uri.replace("PFX", store.settings.prefix), field="dataset")
    assert err.value.field == "dataset"


def test_uri_inside_prefix(store: ObjectStore) -> None:
    uri = store.uri("datasets/digits/")
    assert store.key_from_uri(uri, field="dataset") == "datasets/digits"


def test_store_up_cli_writes_connection_and_stops(tmp_path: Path) -> None:
    data_dir = tmp_path / "store"
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "store", "up", "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        line = proc.stdout.readline()
        info = json.loads(line)
        conn = Connection.read(data_dir)
        assert conn.endpoint == info["endpoint"]
        assert (data_dir / "connection.json").stat().st_mode & 0o077 == 0
        s = ObjectStore(conn.s3_settings())
        s.put_bytes("hello", b"world")
        assert s.get_bytes("hello") == b"world"
    finally:
        proc.terminate()
        start = time.monotonic()
        assert proc.wait(timeout=60) == 0
    assert time.monotonic() - start < 45

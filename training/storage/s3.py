"""The object store: the only module that talks to boto3 (and builds pyarrow's S3 filesystem).

Keys handed in are *relative* to the configured prefix (``models/m/versions/v/manifest.json``);
this module adds ``{prefix}/`` and the bucket. User-supplied URIs become keys only through
:meth:`ObjectStore.key_from_uri`, which enforces the bucket/prefix allow-list.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import boto3
import boto3.exceptions
import botocore.exceptions
from botocore.config import Config
from pydantic import BaseModel, ValidationError

from training.storage.errors import (
    ConflictError,
    IntegrityError,
    NotFoundError,
    SpecError,
    StorageError,
)
from training.storage.location import S3Settings

if TYPE_CHECKING:
    import pyarrow.fs

R = TypeVar("R", bound=BaseModel)

DEFAULT_RECORD_BYTES = 64 * 1024
"""The byte cap of a record kind that declares none (``MAX_BYTES`` on its model)."""

# Keys under our prefix: no "..", no empty segments, a conservative character set.
_KEY_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]{0,254}$")


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: key relative to the prefix, size in bytes, ETag (quoted)."""

    key: str
    size: int
    etag: str


def validate_key(key: str, *, field: str = "key") -> str:
    """Check that a relative key is made of safe segments only; return it unchanged."""
    segments = key.strip("/").split("/")
    if not key or any(not _KEY_SEGMENT.match(s) for s in segments):
        raise SpecError(
            "must be '/'-separated segments of letters, digits and ._=+- (no '..', no '//')",
            field=field,
        )
    return key


class ObjectStore:
    """S3 access for Refit: bytes and JSON in and out, conditional writes, listing."""

    def __init__(self, settings: S3Settings, *, request_path: bool = False) -> None:
        """``request_path``: calls an HTTP request waits on, with the short timeouts and the
        small retry budget of ``settings.request_*`` (else the background ones)."""
        self.settings = settings
        self.request_path = request_path
        self._client: Any = None

    # Ray ships stores to workers; boto3 clients do not pickle, so rebuild lazily there.
    def __getstate__(self) -> dict[str, Any]:
        return {"settings": self.settings, "request_path": self.request_path, "_client": None}

    @property
    def client(self) -> Any:
        """The boto3 S3 client (created on first use)."""
        if self._client is None:
            s = self.settings
            self._client = boto3.client(
                "s3",
                endpoint_url=s.resolved_endpoint(),
                aws_access_key_id=s.resolved_access_key(),
                aws_secret_access_key=s.resolved_secret_key(),
                region_name=s.region,
                config=self._config(),
            )
        return self._client

    def _config(self) -> Config:
        s = self.settings
        fast = self.request_path
        return Config(
            retries={
                "max_attempts": s.request_max_attempts if fast else s.max_attempts,
                "mode": "standard",
            },
            s3={"addressing_style": "path"},
            connect_timeout=s.request_connect_timeout_s if fast else s.connect_timeout_s,
            read_timeout=s.request_read_timeout_s if fast else s.read_timeout_s,
        )

    def ping(self) -> bool:
        """Whether the bucket answers (within this store's timeouts)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
            return False
        return True

    @property
    def bucket(self) -> str:
        """The configured bucket."""
        return self.settings.bucket

    def full_key(self, key: str) -> str:
        """Bucket-relative key: ``{prefix}/{key}``."""
        prefix = self.settings.prefix.strip("/")
        return f"{prefix}/{key}" if prefix else key

    def uri(self, key: str = "") -> str:
        """``s3://bucket/prefix/key`` of a relative key."""
        return f"s3://{self.bucket}/{self.full_key(key)}"

    def key_from_uri(self, uri: str, *, field: str) -> str:
        """Turn a user-supplied ``s3://`` URI into a relative key, refusing anything outside
        the configured bucket and prefix, and anything with ``..`` or odd characters."""
        root = self.uri("")
        if not isinstance(uri, str) or not uri.startswith("s3://"):
            raise SpecError(f"must be an s3:// URI under {root}", field=field)
        if ".." in uri or "//" in uri[len("s3://") :]:
            raise SpecError("must not contain '..' or empty path segments", field=field)
        if not uri.startswith(root):
            raise SpecError(f"must lie under {root}", field=field)
        rel = uri[len(root) :].strip("/")
        if not rel:
            raise SpecError(f"must name an object or folder under {root}", field=field)
        return validate_key(rel, field=field)

    # --- errors ------------------------------------------------------------------------------
    def _translate(self, exc: Exception, key: str) -> Exception:
        if isinstance(exc, botocore.exceptions.ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in {"NoSuchKey", "404", "NotFound"} or status == 404:
                return NotFoundError(f"no object {self.uri(key)}", field=None)
            if code in {"PreconditionFailed", "ConditionalRequestConflict"} or status in {
                409,
                412,
            }:
                return ConflictError(f"{self.uri(key)} changed or already exists")
            return StorageError(f"S3 {code or status} on {self.uri(key)}")
        return StorageError(f"object store unreachable: {type(exc).__name__}: {exc}")

    # --- reads -------------------------------------------------------------------------------
    def get_bytes(self, key: str, *, max_bytes: int | None = None) -> bytes:
        """Read one object; NotFoundError when absent, ValueError when it is larger than
        ``max_bytes`` (checked from the response header, before the body is read)."""
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self.full_key(key))
            if max_bytes is not None and int(resp["ContentLength"]) > max_bytes:
                resp["Body"].close()
                raise ValueError(f"{resp['ContentLength']} bytes exceeds {max_bytes}")
            return bytes(resp["Body"].read())
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise self._translate(exc, key) from exc

    def get_json(self, key: str) -> Any:
        """Read and parse one JSON object."""
        return json.loads(self.get_bytes(key))

    def get_with_etag(self, key: str, *, max_bytes: int | None = None) -> tuple[bytes, str]:
        """Read one object and its ETag (for a later conditional write); ValueError when it
        is larger than ``max_bytes`` (from the response header, before the body is read)."""
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self.full_key(key))
            if max_bytes is not None and int(resp["ContentLength"]) > max_bytes:
                resp["Body"].close()
                raise ValueError(f"{resp['ContentLength']} bytes exceeds {max_bytes}")
            return bytes(resp["Body"].read()), str(resp["ETag"])
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise self._translate(exc, key) from exc

    # --- records: pydantic models stored as JSON ---------------------------------------------
    def get_record(
        self,
        key: str,
        model: type[R],
        *,
        names: Mapping[str, Any] | None = None,
        field: str | None = None,
    ) -> R:
        """One stored record: NotFoundError when absent; IntegrityError (naming ``field``)
        when it is over its kind's byte cap (``model.MAX_BYTES``, declared beside the model;
        checked before the body is read), does not parse as ``model``, or names another record
        than asked for (``names``: field -> the value the key was made from)."""
        return self.get_record_with_etag(key, model, names=names, field=field)[0]

    def get_record_with_etag(
        self,
        key: str,
        model: type[R],
        *,
        names: Mapping[str, Any] | None = None,
        field: str | None = None,
    ) -> tuple[R, str]:
        """:meth:`get_record` and the object's ETag (for a later conditional write)."""
        cap = int(getattr(model, "MAX_BYTES", DEFAULT_RECORD_BYTES))
        try:
            raw, etag = self.get_with_etag(key, max_bytes=cap)
        except ValueError as exc:  # over the cap: no record of this kind is that large
            raise IntegrityError(f"{key} is damaged: {exc}", field=field) from None
        try:
            record = model.model_validate_json(raw)
        except ValidationError as exc:
            kind = model.__name__
            raise IntegrityError(f"{key} is damaged: not a {kind}: {exc}", field=field) from None
        for name, value in (names or {}).items():
            if getattr(record, name) != value:
                found = getattr(record, name)
                raise IntegrityError(f"{key} names another {name}: {found!r}", field=field)
        return record, etag

    def put_record(self, key: str, record: BaseModel, **kwargs: Any) -> str:
        """Write one record as JSON (``put_json``'s conditions: ``if_match``,
        ``if_none_match``); returns the new ETag."""
        return self.put_json(key, record.model_dump(mode="json"), **kwargs)

    def head(self, key: str) -> ObjectInfo | None:
        """Size and ETag of an object, or None when it does not exist."""
        try:
            resp = self.client.head_object(Bucket=self.bucket, Key=self.full_key(key))
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            err = self._translate(exc, key)
            if isinstance(err, NotFoundError):
                return None
            raise err from exc
        return ObjectInfo(key, int(resp["ContentLength"]), str(resp["ETag"]))

    def exists(self, key: str) -> bool:
        """Whether an object exists."""
        return self.head(key) is not None

    def list(self, prefix: str, *, start_after: str | None = None) -> Iterator[ObjectInfo]:
        """Objects under a relative prefix, in key order (paginated, streaming); with
        ``start_after`` (a relative key), only those after it."""
        full = self.full_key(prefix)
        strip = len(self.full_key(""))
        extra = {"StartAfter": self.full_key(start_after)} if start_after else {}
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full, **extra
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    yield ObjectInfo(obj["Key"][strip:], int(obj["Size"]), str(obj["ETag"]))
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise self._translate(exc, prefix) from exc

    # --- writes ------------------------------------------------------------------------------
    def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str = "application/octet-stream",
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> str:
        """Write one object and return its ETag.

        ``if_none_match`` makes the write fail with ConflictError when the key exists (immutable
        objects); ``if_match`` makes it fail unless the current ETag is the given one (compare-
        and-swap of alias pointers).
        """
        extra: dict[str, Any] = {}
        if if_none_match:
            extra["IfNoneMatch"] = "*"
        if if_match is not None:
            extra["IfMatch"] = if_match
        try:
            resp = self.client.put_object(
                Bucket=self.bucket,
                Key=self.full_key(key),
                Body=data,
                ContentType=content_type,
                **extra,
            )
            return str(resp["ETag"])
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise self._translate(exc, key) from exc

    def upload_file(self, key: str, path: Path) -> None:
        """Write a local file to one object (boto3's managed transfer: multipart for large
        files, streamed from disk)."""
        try:
            self.client.upload_file(str(path), self.bucket, self.full_key(key))
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise self._translate(exc, key) from exc
        except boto3.exceptions.S3UploadFailedError as exc:
            raise StorageError(f"upload of {self.uri(key)} failed: {exc}") from exc

    def download_file(self, key: str, path: Path) -> None:
        """Read one object into a local file (boto3's managed transfer)."""
        try:
            self.client.download_file(self.bucket, self.full_key(key), str(path))
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise self._translate(exc, key) from exc

    def put_json(self, key: str, obj: Any, **kwargs: Any) -> str:
        """Write one JSON object (sorted keys, so equal content gives equal bytes)."""
        data = json.dumps(obj, sort_keys=True, indent=1).encode()
        return self.put_bytes(key, data, content_type="application/json", **kwargs)

    def delete(self, key: str) -> None:
        """Delete one object (absent is fine)."""
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.full_key(key))
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise self._translate(exc, key) from exc

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except botocore.exceptions.ClientError:
            pass
        except botocore.exceptions.BotoCoreError as exc:
            raise self._translate(exc, "") from exc
        try:
            self.client.create_bucket(Bucket=self.bucket)
        except botocore.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                raise self._translate(exc, "") from exc

    # --- Ray Train storage -------------------------------------------------------------------
    def arrow_filesystem(self) -> pyarrow.fs.FileSystem:
        """A pyarrow S3 filesystem on the same endpoint, for Ray Train's ``storage_filesystem``."""
        import pyarrow.fs

        s = self.settings
        endpoint = s.resolved_endpoint()
        kwargs: dict[str, Any] = {"region": s.region, "allow_bucket_creation": False}
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
        if s.resolved_access_key():
            kwargs.update(access_key=s.resolved_access_key(), secret_key=s.resolved_secret_key())
        return pyarrow.fs.S3FileSystem(**kwargs)

    def arrow_path(self, key: str) -> str:
        """``bucket/prefix/key``: a path for :meth:`arrow_filesystem`."""
        return f"{self.bucket}/{self.full_key(key)}"

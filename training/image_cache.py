"""Image bytes kept on the node's disk between jobs, by object name and content.

A retrain reads mostly the images its last run read (the base dataset, older labels): each
fetched again costs a store round trip and ~1.3 ms of the job process's CPU in the S3 client
(1,000 images: 1.3 s on 2 cores). This cache keeps the bytes of every image a job fetched in
a directory of the node (``training.image_cache_dir``, bounded by ``image_cache_mb``, oldest
used first out), under a file named by the store, key, ETag and size. A later job lists its
images' folders (one page per thousand objects, :func:`list_names`) and reads an image from
disk only where its key, ETag and size are those cached; a changed object has a new ETag and
is fetched again.

Nothing read from disk is trusted on its name alone: a file is used only when its length is
the object's size and its MD5 is the object's ETag (what S3 and SeaweedFS give an object
written in one part). Objects with another kind of ETag (multipart uploads, SSE-KMS) are
never cached. The directory is the process user's alone (0700); one that is not is not used.
Writes are atomic (a temporary file renamed), so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import stat
import tempfile
import threading
import uuid
from pathlib import Path

from training.storage.errors import RefitError
from training.storage.s3 import ObjectStore

log = logging.getLogger(__name__)

Name = tuple[str, str, int]
"""An object's key, ETag and size: what stays equal while its content does."""

LIST_FACTOR = 4
"""A folder is listed for its ETags only while it holds at most this many times the objects a
run wants from it (beyond that, listing it costs more than what it saves)."""

_MD5_ETAG = re.compile(r'"?([0-9a-f]{32})"?')
_FILE = re.compile(r"[0-9a-f]{64}")
PRUNE_TO = 0.8
"""Once over its budget, the cache drops its least recently used files down to this share."""


def list_names(store: ObjectStore, keys: list[str]) -> dict[str, Name]:
    """The current ETag and size of ``keys``, from listings of their folders (the first two
    parts of a key: ``datasets/{name}/``); a key whose folder holds too many other objects,
    or that is not there, is left out. A store that cannot be listed names none."""
    folders: dict[str, set[str]] = {}
    for key in keys:
        parts = key.split("/")
        folder = "/".join(parts[:2]) + "/" if len(parts) > 2 else ""
        folders.setdefault(folder, set()).add(key)
    out: dict[str, Name] = {}
    try:
        for folder, wanted in folders.items():
            if not folder:
                continue
            for seen, obj in enumerate(store.list(folder), start=1):
                if seen > LIST_FACTOR * len(wanted) + 1000:
                    break
                if obj.key in wanted:
                    out[obj.key] = (obj.key, obj.etag, obj.size)
    except RefitError as exc:
        log.warning("could not list images' folders: %s", exc)
    return out


def _md5_of_etag(etag: str) -> str | None:
    match = _MD5_ETAG.fullmatch(etag)
    return match.group(1) if match else None


def default_dir() -> Path:
    """The node's cache directory when none is configured: one per user under the system's
    temporary directory."""
    return Path(tempfile.gettempdir()) / f"refit-image-cache-{os.getuid()}"


def private_dir(path: Path) -> bool:
    """Create ``path`` (0700) or check that it is this user's alone."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.lstat()
    except OSError as exc:
        log.warning("image cache %s unusable: %s", path, exc)
        return False
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        log.warning("image cache %s is not this user's private directory: not used", path)
        return False
    return True


class DiskImageCache:
    """Image bytes on the node's disk for one store (see the module docstring)."""

    def __init__(self, root: Path, max_bytes: int, store_id: str) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.store_id = store_id
        self._lock = threading.Lock()
        self._used: int | None = None  # measured at the first write

    @classmethod
    def for_store(cls, store: ObjectStore, root: Path | None, max_mb: int) -> DiskImageCache | None:
        """The cache of ``store``'s objects under ``root`` (default: :func:`default_dir`);
        None when off (``max_mb`` 0) or the directory is not private."""
        if max_mb <= 0:
            return None
        root = root or default_dir()
        if not private_dir(root):
            return None
        s = store.settings
        store_id = f"{s.endpoint_url}\0{store.bucket}\0{store.full_key('')}"
        return cls(root, max_mb * 1024 * 1024, store_id)

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_lock": None, "_used": None}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _path(self, name: Name) -> Path:
        key, etag, size = name
        digest = hashlib.sha256(f"{self.store_id}\0{key}\0{etag}\0{size}".encode()).hexdigest()
        return self.root / digest

    def holds(self, name: Name) -> bool:
        """Whether a file for the object so named is here (not yet verified: :meth:`read`)."""
        return _md5_of_etag(name[1]) is not None and self._path(name).exists()

    def read(self, name: Name) -> bytes | None:
        """The cached bytes of the object so named, verified against its size and ETag;
        None when not cached (or the file does not verify: it is then removed)."""
        md5 = _md5_of_etag(name[1])
        if md5 is None:
            return None
        path = self._path(name)
        try:
            with path.open("rb") as f:
                data = f.read(name[2] + 1)
        except OSError:
            return None
        if len(data) != name[2] or hashlib.md5(data, usedforsecurity=False).hexdigest() != md5:
            log.warning("image cache file %s does not match its object: removed", path.name)
            path.unlink(missing_ok=True)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: pruned last
        return data

    def write(self, key: str, etag: str, data: bytes) -> None:
        """Keep an object's bytes as fetched with that ETag (only a one-part object whose MD5
        the bytes match; best effort: a full or read-only disk costs a later fetch)."""
        md5 = _md5_of_etag(etag)
        if md5 is None or len(data) > self.max_bytes // 4:
            return
        if hashlib.md5(data, usedforsecurity=False).hexdigest() != md5:
            return
        path = self._path((key, etag, len(data)))
        if path.exists():
            return
        tmp = self.root / f".{uuid.uuid4().hex}.tmp"
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.warning("image cache write failed: %s", exc)
            return
        with self._lock:
            if self._used is None:
                self._used = self._measure()
            else:
                self._used += len(data)
            if self._used > self.max_bytes:
                self._used = self._prune()

    def _measure(self) -> int:
        total = 0
        for entry in os.scandir(self.root):
            if _FILE.fullmatch(entry.name):
                try:
                    total += entry.stat().st_size
                except OSError:
                    continue
        return total

    def _prune(self) -> int:
        """Remove the least recently used files down to :data:`PRUNE_TO` of the budget (other
        processes may share the directory: what is gone is fetched again); the bytes left."""
        files: list[tuple[float, int, str]] = []
        for entry in os.scandir(self.root):
            if _FILE.fullmatch(entry.name):
                try:
                    st = entry.stat()
                except OSError:
                    continue
                files.append((st.st_mtime, st.st_size, entry.path))
        files.sort()
        total = sum(size for _, size, _ in files)
        for _, size, path in files:
            if total <= self.max_bytes * PRUNE_TO:
                break
            try:
                os.unlink(path)
            except OSError:
                continue
            total -= size
        return total


__all__ = ["DiskImageCache", "Name", "default_dir", "list_names"]

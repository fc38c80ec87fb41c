"""A version's weights stored stage by stage, each stage's file written once.

A fine-tune under a freeze policy keeps its frozen stages byte-identical to its parent's
(``training.stage_digests``): a ``head_only`` child of resnet18 differs in ~20 KB of 45 MB.
So a version's weights are one safetensors file per stage, and a stage whose content
(its digest) a published version already stores is not written again: the new version's
manifest names that version's file. Publishing a head-only retrain writes its head; a reader
that holds the parent's stages (a :class:`StageCache`) reads only the head.

Files are only ever named by *published* versions (a manifest learnt from the store), and a
version is never deleted, so a file another version names never goes away; the files an
upload wrote for a version that is then discarded are its own, and go with it. Every file is
verified against the sha256 and size its manifest records before it is used.
"""

from __future__ import annotations

import functools
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import save as st_save

from training.storage.errors import IntegrityError
from training.storage.ids import is_id

STAGE_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
"""What a stage's name may be (it becomes part of its file's key)."""


class StageFile(BaseModel):
    """Where a stage's tensors are stored: the file of the version that first stored them."""

    model_config = ConfigDict(extra="forbid")

    model: str
    version: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


@dataclass(frozen=True)
class StageTensors:
    """One stage of a state dict: its name, its content digest and its tensors."""

    name: str
    sha256: str
    tensors: dict[str, torch.Tensor]


def stage_key(name: str, file: StageFile) -> str:
    """The store key of a stage's file (ids and the stage name checked: a manifest read from
    the store never names a key outside its model's versions)."""
    if not (is_id(file.model) and is_id(file.version) and STAGE_NAME.fullmatch(name)):
        raise IntegrityError(f"stage {name!r} names no stored file: {file}", field="version")
    return f"models/{file.model}/versions/{file.version}/stages/{name}.safetensors"


def stage_blob(stage: StageTensors) -> bytes:
    """A stage's file: its tensors, and its name and digest as metadata (nothing of the
    version: the same stage is the same bytes in every version that stores it). One metadata
    key: safetensors writes several in a hash map's order, which differs between calls."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in stage.tensors.items()}
    return st_save(tensors, metadata={"refit.stage": f"{stage.name} sha256:{stage.sha256}"})


class StageCache:
    """Verified stage files by sha256, least recently used dropped beyond ``max_bytes``, and
    which published file holds each stage content seen (so a new version names it instead of
    writing it again). Thread-safe: hot-loads and publishes run on worker threads.

    Holds bytes, not tensors: every read gets tensors of its own, so a model built on them
    (by assignment) never shares storage with another reader's."""

    KNOWN_LIMIT = 4096
    """Stage contents remembered (a digest and a file record each: small)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._blobs: OrderedDict[str, bytes] = OrderedDict()
        self._known: OrderedDict[tuple[str, str, str], StageFile] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, sha256: str) -> bytes | None:
        """A verified file's bytes, or None."""
        with self._lock:
            blob = self._blobs.get(sha256)
            if blob is None:
                self.misses += 1
                return None
            self._blobs.move_to_end(sha256)
            self.hits += 1
            return blob

    def put(self, sha256: str, blob: bytes) -> None:
        """Keep a file's bytes (the caller verified them, or wrote them)."""
        if len(blob) > self.max_bytes:
            return
        with self._lock:
            if sha256 in self._blobs:
                self._blobs.move_to_end(sha256)
                return
            self._blobs[sha256] = blob
            self._size += len(blob)
            while self._size > self.max_bytes:
                _, dropped = self._blobs.popitem(last=False)
                self._size -= len(dropped)

    def learn(self, where: str, name: str, digest: str, file: StageFile) -> None:
        """A published version in store ``where`` (its endpoint, bucket and prefix) stores
        stage ``name`` with content ``digest`` in ``file``."""
        with self._lock:
            self._known[(where, name, digest)] = file
            self._known.move_to_end((where, name, digest))
            while len(self._known) > self.KNOWN_LIMIT:
                self._known.popitem(last=False)

    def stored(self, where: str, name: str, digest: str) -> StageFile | None:
        """The published file of a stage content in store ``where``, when one was seen."""
        with self._lock:
            return self._known.get((where, name, digest))

    @property
    def size(self) -> int:
        """Bytes held."""
        return self._size


@functools.cache
def process_stage_cache(max_mb: int) -> StageCache:
    """This process's stage cache of ``max_mb`` MiB: a replica's hot-loads (and a job's
    steps) share what the earlier ones read or wrote."""
    return StageCache(max_mb * 1024 * 1024)

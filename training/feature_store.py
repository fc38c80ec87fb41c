"""Penultimate features of images, kept on the store per trunk and image content, so that a
head-only retrain computes features only for the images its trunk has not seen yet.

    features/{trunk}/{pack}.safetensors   "sha256": uint8 [N, 32], "features": float32 [N, D]
    features/names/{pack}.json            [[key, etag, size, sha256], ...]: contents known

Knowing an image's sha256 takes its bytes; knowing that it did not change takes a listing. The
names packs remember the sha256 of every object a run hashed, under its key, ETag and size:
a later run lists its images' folders (a page per thousand objects) and hashes only the objects
it has no name for, or whose ETag or size changed (a new write gets a new ETag). Like the
feature packs they are written once, merged at :data:`MAX_PACKS`, read within ``max_bytes``.

``trunk`` (:func:`trunk_id`) is the sha256 of everything a feature depends on: the backbone,
the trunk's tensors, the evaluation preprocessing and the precision. Equal content shares
features (a fine-tune whose trunk stayed frozen, a variant of the same backbone); any change
misses. A pack is written once (if-none-match) and never changed; a trunk's packs are merged
into one when they reach :data:`MAX_PACKS` (a reader that finds one gone computes those
features again). Reads are bounded in bytes (``max_bytes``); a damaged pack is skipped, never
trusted. Safetensors only: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import uuid

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from training.image_cache import Name, list_names
from training.preprocessing_spec import Preprocessing
from training.stage_digests import update_with_tensors
from training.storage.errors import NotFoundError, RefitError
from training.storage.s3 import ObjectInfo, ObjectStore

log = logging.getLogger(__name__)

PREFIX = "features/"
MAX_PACKS = 8
"""Packs per trunk before the next write merges them."""
FORMAT = 1
"""Part of every trunk id: a change of how features are made (decode, transform) bumps it."""

_PACK = re.compile(r"\d{20}-[0-9a-f]{12}\.safetensors")
_NAMES = re.compile(r"\d{20}-[0-9a-f]{12}\.json")
NAMES_PREFIX = f"{PREFIX}names/"
_TRUNK = re.compile(r"[0-9a-f]{64}")


def trunk_id(body: nn.Module, backbone: str, pre: Preprocessing, *, bf16: bool) -> str:
    """The content id of a trunk's features: backbone, every tensor of the trunk (names,
    dtypes, shapes, bytes), the preprocessing and the precision."""
    h = hashlib.sha256()
    meta = {"format": FORMAT, "backbone": backbone, "pre": pre.model_dump(mode="json")}
    h.update(json.dumps({**meta, "bf16": bf16}, sort_keys=True).encode())
    update_with_tensors(h, body.state_dict().items())
    return h.hexdigest()


def _rows(data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """A pack's ``(sha256 [N, 32] uint8, features [N, D] float32)``; ValueError if damaged."""
    try:
        tensors = load_tensors(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ValueError(f"not a feature pack: {exc}") from exc
    keys, feats = tensors.get("sha256"), tensors.get("features")
    if (
        keys is None
        or feats is None
        or keys.dtype != torch.uint8
        or feats.dtype != torch.float32
        or keys.ndim != 2
        or keys.shape[1] != 32
        or feats.ndim != 2
        or feats.shape[0] != keys.shape[0]
    ):
        raise ValueError("not a feature pack: wrong tensors")
    return keys, feats


class FeatureStore:
    """Features per trunk and image sha256 on the object store."""

    def __init__(self, store: ObjectStore, *, max_bytes: int) -> None:
        self.store, self.max_bytes = store, max_bytes

    def _packs(self, trunk: str) -> list[ObjectInfo]:
        """The trunk's packs, oldest first (names start with their time)."""
        if not _TRUNK.fullmatch(trunk):
            raise ValueError("not a trunk id")
        prefix = f"{PREFIX}{trunk}/"
        return [o for o in self.store.list(prefix) if _PACK.fullmatch(o.key.removeprefix(prefix))]

    def _read(self, trunk: str, wanted: set[str] | None) -> dict[str, torch.Tensor]:
        """Rows of ``trunk``: only the ``wanted`` sha256s (None: all)."""
        found: dict[str, torch.Tensor] = {}
        packs = self._packs(trunk)
        budget, dim = self.max_bytes, None
        for key in [p.key for p in reversed(packs)]:  # newest first
            if wanted is not None and wanted <= found.keys():
                break
            try:
                data = self.store.get_bytes(key, max_bytes=budget)
                keys, feats = _rows(data)
            except NotFoundError:  # merged away meanwhile: those are computed again
                continue
            except ValueError as exc:  # too large for what is left, or damaged: not trusted
                log.warning("feature pack %s skipped: %s", key, exc)
                continue
            budget -= len(data)
            if dim is not None and feats.shape[1] != dim:
                log.warning(
                    "feature pack %s skipped: %d features, not %d", key, feats.shape[1], dim
                )
                continue
            dim = int(feats.shape[1])
            for digest, row in zip(keys.numpy(), feats, strict=True):
                sha = digest.tobytes().hex()
                if (wanted is None or sha in wanted) and sha not in found:
                    found[sha] = row.clone()
        return found

    def lookup(self, trunk: str, wanted: set[str]) -> dict[str, torch.Tensor]:
        """The stored features of the ``wanted`` image sha256s (the rest are missing). A
        store that cannot be read is a miss, never a failure of the job."""
        if not wanted:
            return {}
        try:
            return self._read(trunk, wanted)
        except RefitError as exc:
            log.warning("feature store unreadable, computing every feature: %s", exc)
            return {}

    def add(self, trunk: str, rows: dict[str, torch.Tensor]) -> None:
        """Store new rows as one pack (merging the trunk's packs when there are
        :data:`MAX_PACKS`). Best effort: a failed write only costs a later recompute."""
        if not rows:
            return
        try:
            packs = self._packs(trunk)
            # merged only while all of them can be read (else the new rows get a pack alone)
            merge = len(packs) >= MAX_PACKS and sum(p.size for p in packs) <= self.max_bytes
            merged: dict[str, torch.Tensor] = {}
            if merge:
                merged = self._read(trunk, None)
            merged.update(rows)
            shas = sorted(merged)
            keys = torch.tensor([list(bytes.fromhex(s)) for s in shas], dtype=torch.uint8)
            feats = torch.stack([merged[s].float().cpu() for s in shas]).contiguous()
            name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.safetensors"
            data = save_tensors({"sha256": keys, "features": feats})
            self.store.put_bytes(f"{PREFIX}{trunk}/{name}", data, if_none_match=True)
            if merge:
                for pack in packs:  # every row is in the new pack
                    self.store.delete(pack.key)
        except RefitError as exc:
            log.warning("could not store %d features: %s", len(rows), exc)

    # --- content names ------------------------------------------------------------------
    def _name_packs(self) -> list[ObjectInfo]:
        return [
            o
            for o in self.store.list(NAMES_PREFIX)
            if _NAMES.fullmatch(o.key.removeprefix(NAMES_PREFIX))
        ]

    def _read_names(self, packs: list[ObjectInfo]) -> dict[Name, str]:
        names: dict[Name, str] = {}
        budget = self.max_bytes
        for pack in reversed(packs):  # newest first
            try:
                data = self.store.get_bytes(pack.key, max_bytes=budget)
                rows = json.loads(data)["names"]
                budget -= len(data)
                for key, etag, size, sha in rows:
                    if _TRUNK.fullmatch(sha):  # a sha256 (hex), the same shape
                        names.setdefault((str(key), str(etag), int(size)), sha)
            except NotFoundError:
                continue
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("names pack %s skipped: %s", pack.key, exc)
        return names

    def known_contents(
        self, keys: list[str], listed: dict[str, Name] | None = None
    ) -> tuple[dict[str, str], dict[str, Name]]:
        """The sha256 of those ``keys`` whose key, ETag and size a names pack holds, and the
        names (key, ETag, size) of all listed keys (for :meth:`add_names` once the rest are
        hashed; ``listed``: named already, no listing). A store that cannot be read knows
        none."""
        listed = list_names(self.store, keys) if listed is None else listed
        if not listed:
            return {}, listed
        try:
            names = self._read_names(self._name_packs())
        except RefitError as exc:
            log.warning("names unreadable, hashing every image: %s", exc)
            return {}, listed
        return {k: names[n] for k, n in listed.items() if n in names}, listed

    def add_names(self, rows: dict[Name, str]) -> None:
        """Remember the sha256 of objects hashed now (merging the packs at
        :data:`MAX_PACKS`). Best effort: a failed write costs a later hash."""
        if not rows:
            return
        try:
            packs = self._name_packs()
            merge = len(packs) >= MAX_PACKS and sum(p.size for p in packs) <= self.max_bytes
            merged = self._read_names(packs) if merge else {}
            merged.update(rows)
            body = {"names": [[k, e, s, sha] for (k, e, s), sha in sorted(merged.items())]}
            name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.json"
            data = json.dumps(body, separators=(",", ":")).encode()
            self.store.put_bytes(f"{NAMES_PREFIX}{name}", data, if_none_match=True)
            if merge:
                for pack in packs:
                    self.store.delete(pack.key)
        except RefitError as exc:
            log.warning("could not store %d names: %s", len(rows), exc)


__all__ = ["FeatureStore", "trunk_id"]

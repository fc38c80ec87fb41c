"""Penultimate features of images, kept on the store per trunk and image content, so that a
head-only retrain computes features only for the images its trunk has not seen yet.

    features/{trunk}/{pack}.safetensors   "sha256": uint8 [N, 32], "features": float32 [N, D]

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

from training.preprocess import Preprocessing
from training.storage.errors import NotFoundError, RefitError
from training.storage.s3 import ObjectInfo, ObjectStore

log = logging.getLogger(__name__)

PREFIX = "features/"
MAX_PACKS = 8
"""Packs per trunk before the next write merges them."""
FORMAT = 1
"""Part of every trunk id: a change of how features are made (decode, transform) bumps it."""

_PACK = re.compile(r"\d{20}-[0-9a-f]{12}\.safetensors")
_TRUNK = re.compile(r"[0-9a-f]{64}")


def trunk_id(body: nn.Module, backbone: str, pre: Preprocessing, *, bf16: bool) -> str:
    """The content id of a trunk's features: backbone, every tensor of the trunk (names,
    dtypes, shapes, bytes), the preprocessing and the precision."""
    h = hashlib.sha256()
    meta = {"format": FORMAT, "backbone": backbone, "pre": pre.model_dump(mode="json")}
    h.update(json.dumps({**meta, "bf16": bf16}, sort_keys=True).encode())
    for name, tensor in sorted(body.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
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


__all__ = ["FeatureStore", "trunk_id"]
